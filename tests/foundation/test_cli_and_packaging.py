"""The command line (fast --help, every subcommand listed, clear errors) and the installable package
(a non-editable wheel carries minirl_async, minirl_async.proto and minirl_async.services)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from minirl_async.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("run", "learner", "sampler", "grader", "sft", "eval", "report", "bench", "keys"):
        assert name in COMMANDS and f"    {name} " in out


def test_help_imports_nothing_heavy() -> None:
    # "--help answers in well under a second" is a property of what gets imported, not a timing assertion.
    code = (
        "import sys, contextlib, io\n"
        "from minirl_async.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'zmq', 'numpy', 'pydantic', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"--help imported {out.strip()}"


def test_config_error_is_a_clean_exit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner]\nnum_stepz = 3\n")
    assert main(["sft", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "learner.num_stepz" in err and "learner.num_steps" in err


def test_unknown_bench_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "no_such_bench"]) == 2
    assert "unknown benchmark 'no_such_bench'" in capsys.readouterr().err


def test_overlap_bench_finds_its_config_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # it used to open "configs/tiny.toml" relative to the working directory: outside the repo root it failed
    from minirl_async.bench.overlap import tiny_config_path

    monkeypatch.chdir(tmp_path)
    path = Path(tiny_config_path())
    assert path.is_absolute() and path.is_file() and path.name == "tiny.toml"


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"minirl_async." + ".".join(p.parent.relative_to(ROOT / "minirl_async").parts)
             for p in (ROOT / "minirl_async").rglob("__init__.py")}
    found = {f.rstrip(".") for f in found} | {"minirl_async.proto", "minirl_async.services"}
    assert found <= listed, f"folders missing from [tool.setuptools] packages: {sorted(found - listed)}"


@pytest.mark.timeout(600)
def test_non_editable_wheel_installs_and_imports(tmp_path: Path) -> None:
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
         str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = wheel_dir.glob("minirl_async-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"minirl_async/__init__.py", "minirl_async/proto/__init__.py", "minirl_async/services/__init__.py",
            "minirl_async/config.py"} <= names
    assert not any(n.startswith(("proto/", "services/", "tests/")) for n in names), "generic top-level package leaked"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)
    code = (f"import sys; sys.path.insert(0, {str(target)!r})\n"
            "import minirl_async, minirl_async.proto, minirl_async.services, minirl_async.config\n"
            f"assert minirl_async.proto.__file__.startswith({str(target)!r}), minirl_async.proto.__file__\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
