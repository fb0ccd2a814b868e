#!/usr/bin/env bash
# The main job on a bundled example: check the study, synthesize a multi-site DICOM corpus with
# injected deviations and planted PHI, run the pipeline, export documents, CWL and e-protocols.
set -euo pipefail
STUDY=${1:-examples/amyloid_mri.imtrial}
OUT=${2:-demo-out}
# Demo-only key. A real study sets IMTRIAL_KEY (or a key file) outside the repository.
export IMTRIAL_KEY=${IMTRIAL_KEY:-demo-key-not-for-real-data}
export CENTRAL_TOKEN=${CENTRAL_TOKEN:-unused-in-demo}
PATH="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin:$PATH"
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== imtrial check $STUDY"
imtrial check "$STUDY"
echo "== imtrial synth (2 subjects per site, deviations injected, PHI planted)"
imtrial synth "$STUDY" --out "$OUT/inbox" --subjects 2 --small --seed 42 \
  --deviations param_off,wrong_device,missing_visit,ghosting,corrupt_file,software_upgrade >/dev/null
echo "== imtrial run"
imtrial run "$STUDY" --inbox "$OUT/inbox" --workdir "$OUT/work" --jobs 2
imtrial verify --workdir "$OUT/work"
echo "== exports"
imtrial export docs "$STUDY" -o "$OUT/docs" >/dev/null
imtrial export cwl "$STUDY" -o "$OUT/cwl" >/dev/null
imtrial export eprotocol "$STUDY" -o "$OUT/eprotocol" >/dev/null
imtrial export inventory "$STUDY" -o "$OUT/inventory" >/dev/null
imtrial graph "$STUDY" --format svg -o "$OUT/graph.svg"
imtrial report "$STUDY" --workdir "$OUT/work" -o "$OUT/report" >/dev/null
cat <<TXT

Outputs in $OUT/:
  inbox/                 synthetic DICOM as sites would send it (with PHI and deviations)
  work/archive/          de-identified, content-addressed archive + audit log
  work/quarantine/       files refused, each with reason.json
  work/measurements.csv  analysis measurements (tidy table)
  docs/                  Imaging Charter and Site Imaging Manual (md, html, pdf)
  cwl/                   the same pipeline as a CWL v1.2 workflow
  eprotocol/             electronic protocols (DICOM DPP for CT/XA, JSON + scanner cards)
  inventory/             sites, devices, contacts (csv, html)
  report/                management report (html, csv, json)
  graph.svg              the dependency graph
TXT
