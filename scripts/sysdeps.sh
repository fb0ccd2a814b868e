#!/usr/bin/env bash
# Install the system tools the tests need (Debian/Ubuntu), if missing: graphviz (dot),
# poppler-utils (pdftoppm), dicom3tools (dciodvfy), orthanc + orthanc-dicomweb (a real DICOM/DICOMweb
# receiver for tests/test_transfer.py), chromium (headless, for tests/test_report_browser.py: the management
# report measured in a real browser), dcmtk (findscu/storescu: a real worklist client and scanner for
# tests/test_worklist.py and tests/test_listen.py), stunnel4 + openssl (the HTTPS relay of tests/test_pull.py).
# Idempotent; needs root or sudo.
set -eu
missing=()
command -v dot >/dev/null      || missing+=(graphviz)
command -v pdftoppm >/dev/null || missing+=(poppler-utils)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v chromium >/dev/null || missing+=(chromium)
# dcmtk's own binaries: pynetdicom installs scripts of the same names into the venv, which may be on PATH
{ [ -x /usr/bin/findscu ] && [ -x /usr/bin/storescu ]; } || missing+=(dcmtk)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
command -v openssl >/dev/null  || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v apt-get >/dev/null; then
  echo "sysdeps: please install: ${missing[*]}" >&2; exit 1
fi
echo "sysdeps: installing ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
