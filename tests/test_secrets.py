"""The one reader of keys and tokens: env or file, relative files against the study's folder, one trailing
newline dropped, errors that name the source and never the value; the same answer for every reader."""
from __future__ import annotations

from pathlib import Path

import pytest

from imtrial_dsl import ir
from imtrial_dsl.loader import load
from imtrial_dsl.secrets import SecretError, read_secret

SECRET = "s3cret-value-4242-abcdef"


def _src(kind: str, ref: str) -> ir.KeySource:
    return ir.KeySource(kind=kind, ref=ref)


def test_env_variable(monkeypatch):
    monkeypatch.setenv("IMTRIAL_TEST_SECRET", SECRET + "\n")
    assert read_secret(_src("env", "IMTRIAL_TEST_SECRET"), study_file=None) == SECRET.encode()
    monkeypatch.setenv("IMTRIAL_TEST_SECRET", "")
    with pytest.raises(SecretError, match="environment variable IMTRIAL_TEST_SECRET is empty"):
        read_secret(_src("env", "IMTRIAL_TEST_SECRET"), study_file=None)
    monkeypatch.delenv("IMTRIAL_TEST_SECRET")
    with pytest.raises(SecretError) as err:
        read_secret(_src("env", "IMTRIAL_TEST_SECRET"), study_file=None, what="de-identification key")
    d = err.value.diagnostic
    assert d.code == "E702" and d.message == "de-identification key: environment variable IMTRIAL_TEST_SECRET is not set"


def test_relative_file_resolves_against_the_study_folder(tmp_path, monkeypatch):
    study_dir, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    study_dir.mkdir(), elsewhere.mkdir()
    (study_dir / "k.txt").write_text(SECRET + "\n")
    (elsewhere / "k.txt").write_text("the-wrong-key\n")      # a same-named file in the cwd is not used
    monkeypatch.chdir(elsewhere)
    assert read_secret(_src("file", "k.txt"), study_file=str(study_dir / "s.imtrial")) == SECRET.encode()
    rel_study = Path("..") / "study" / "s.imtrial"              # the study itself named relative to the cwd
    assert read_secret(_src("file", "k.txt"), study_file=str(rel_study)) == SECRET.encode()
    assert read_secret(_src("file", str(study_dir / "k.txt")), study_file=None) == SECRET.encode()
    assert read_secret(_src("file", "k.txt"), study_file="<string>") == b"the-wrong-key"   # no file: the cwd


@pytest.mark.parametrize("content, key", [(b"k3y\n", b"k3y"), (b"k3y\r\n", b"k3y"), (b"k3y", b"k3y"),
                                          (b"k3y\n\n", b"k3y\n"), (b" k3y \n", b" k3y ")])
def test_exactly_one_trailing_newline_is_dropped(tmp_path, content, key):
    (tmp_path / "k").write_bytes(content)
    assert read_secret(_src("file", "k"), study_file=str(tmp_path / "s.imtrial")) == key


def test_file_errors_name_the_file_never_the_value(tmp_path):
    study = str(tmp_path / "s.imtrial")
    with pytest.raises(SecretError) as err:
        read_secret(_src("file", "missing.key"), study_file=study)
    assert "missing.key" in err.value.diagnostic.message and err.value.diagnostic.code == "E702"
    for blank in (b"", b"\n", b"  \n"):
        (tmp_path / "empty.key").write_bytes(blank)
        with pytest.raises(SecretError, match="empty"):
            read_secret(_src("file", "empty.key"), study_file=study)
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(SecretError) as err:
        read_secret(_src("file", "dir.key"), study_file=study)
    assert "dir.key" in str(err.value) and SECRET not in str(err.value)


STUDY = '''import "stdlib/deid/ps315.imtrial"
study SEC01 "Secrets" { sponsor "Tests" }
deidentify using ps315_basic with retain_longitudinal_modified_dates { key file "k.txt" }
identifiers {
  subject "SEC01-{site}-{seq:03}"
  key file "k.txt"
}
transfer central dicomweb "https://central.example/dicom-web" auth file "k.txt"
'''


def test_every_reader_finds_the_study_folders_key_from_another_cwd(tmp_path, monkeypatch):
    from imtrial_dsl.deid import resolve_key, subject_date_shift
    from imtrial_dsl.runner.identify import lookup_key
    from imtrial_dsl.runner.run import preflight
    from imtrial_dsl.transfer.destinations import read_token

    (tmp_path / "study").mkdir(), (tmp_path / "elsewhere").mkdir()
    (tmp_path / "study" / "s.imtrial").write_text(STUDY)
    (tmp_path / "study" / "k.txt").write_text(SECRET + "\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    trial, diags, _ = load("../study/s.imtrial")
    assert not [d for d in diags if d.severity.value == "error"], diags
    assert preflight(trial) == []
    assert resolve_key(trial) == lookup_key(trial) == SECRET.encode()
    assert read_token(trial.transfers[0].auth) == SECRET
    assert subject_date_shift(trial, "SEC01-X-001") is not None
    (tmp_path / "study" / "k.txt").unlink()
    problems = preflight(trial)
    assert len(problems) == 2 and all("'k.txt'" in p and SECRET not in p for p in problems)
