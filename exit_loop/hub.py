"""Pushing a run's splits and checkpoints to the Hugging Face hub (huggingface_hub).

    exit-loop run configs/exit_gsm8k_qwen2.5-math-1.5b.yaml \\
        filter.push_to_hub=my-org/exit-gsm8k-traces train.hub_model_id=my-org/exit-gsm8k-student

- `filter.push_to_hub: ORG/NAME`: the splits as a dataset repository, a config per round
  (`round_00`, or `<arm>_round_00` with several arms) whose split `correct` holds the correct
  split's prompt/response rows, and beside it a config `<round>-all` whose split `all_traces`
  holds every trace with its labels and provenance (`datasets` rejects a split named `all`, and
  wants one set of columns per config): `load_dataset("ORG/NAME", "round_01", split="correct")`,
  `load_dataset("ORG/NAME", "round_01-all", split="all_traces")`.
- `train.hub_model_id: ORG/NAME` (or `sft.push_to_hub: true` with `sft.hub_model_id`, which is
  routed here rather than letting TRL upload its `trainer/` folder): each round's merged `ckpt/`
  (weights, tokenizer, and the generation config that carries the trained EOS) as a revision, a
  branch named `<arm>-round_KK` (`round_KK` with one arm).

The token comes from the HF_TOKEN environment variable only, and is never written anywhere. A
run that needs the hub checks it before any GPU work (`check_hub`): no token, HF_HUB_OFFLINE set
or the hub unreachable fails at once, naming the setting that needs it. What is uploaded is first
staged in `<run dir>/hub/<repo name>/` (files linked, not copied, where the disk allows), so it can
be read before and after the upload.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from exit_loop.errors import ConfigError
from exit_loop.jsonl import atomic_write_text

TOKEN_ENV = "HF_TOKEN"
SPLITS = {"correct": "correct", "all": "all_traces"}  # our split -> its name on the hub


def check_hub(settings: dict[str, str | None]) -> None:
    """Fail (ConfigError naming the setting) unless the hub can be written to: `settings` maps a
    config key (e.g. 'filter.push_to_hub') to its repository id, None where unset."""
    wanted = {key: repo for key, repo in settings.items() if repo}
    if not wanted:
        return
    names = ", ".join(f"{key}={repo}" for key, repo in wanted.items())
    for key, repo in wanted.items():
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(f"config key '{key}': expected a repository id ORG/NAME, got {repo!r}")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{names} needs the hub, but HF_HUB_OFFLINE is set; unset it or remove the setting")
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError(f"{names} needs the hub: set {TOKEN_ENV} to a token with write access "
                          "(it is read from the environment only)")
    from huggingface_hub import HfApi

    try:
        HfApi(token=token).whoami()
    except Exception as e:  # noqa: BLE001 - any failure to reach or authenticate means "not usable"
        reason = str(e).replace(token, "***").splitlines()[0][:300]
        raise ConfigError(f"{names} needs the hub, which did not answer ({type(e).__name__}: {reason})") from None


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def dataset_card(configs: list[str]) -> str:
    """README.md of the dataset repository: its configs and splits, as `datasets` reads them."""
    lines = ["---", "configs:"]
    for name in configs:
        for suffix, split in (("", SPLITS["correct"]), ("-all", SPLITS["all"])):
            lines += [f"- config_name: {name}{suffix}", "  data_files:",
                      f"  - split: {split}", f"    path: {name}/{split}.jsonl"]
    lines += ["---", "", "Expert-iteration traces written by exit-loop: per round, `correct` holds the",
              "verified correct traces as prompt/response rows and `all_traces` every trace with its",
              "labels and provenance.", ""]
    return "\n".join(lines)


def stage_splits(staging: Path, config: str, correct: Path, all_split: Path) -> Path:
    """Add one round's splits as `config` to the dataset folder `staging` (earlier rounds' configs
    stay) and rewrite its card; returns `staging`."""
    _link(correct, staging / config / f"{SPLITS['correct']}.jsonl")
    _link(all_split, staging / config / f"{SPLITS['all']}.jsonl")
    configs = sorted(p.parent.name for p in staging.glob(f"*/{SPLITS['correct']}.jsonl"))
    atomic_write_text(staging / "README.md", dataset_card(configs))
    return staging


def stage_checkpoint(staging: Path, ckpt: Path, base_model: str, revision: str) -> Path:
    """The checkpoint folder as it is uploaded: every file of `ckpt` (generation config included)
    and a model card; returns `staging`."""
    if staging.exists():
        shutil.rmtree(staging)
    ckpt = ckpt.resolve()
    for path in sorted(ckpt.rglob("*")):
        if path.is_file():
            _link(path, staging / path.relative_to(ckpt))
    if not (staging / "generation_config.json").exists():
        raise ConfigError(f"{ckpt}: no generation_config.json; the trained EOS would not reach the hub")
    atomic_write_text(staging / "README.md", "\n".join([
        "---", f"base_model: {base_model}", "library_name: transformers", "tags: [exit-loop, expert-iteration]",
        "---", "", f"Expert-iteration checkpoint `{revision}` fine-tuned from `{base_model}` by exit-loop",
        "(the merged weights the next round samples with).", ""]))
    return staging


def upload(staging: Path, repo_id: str, repo_type: str, message: str, revision: str | None = None) -> str:
    """Upload the staged folder (creating the repository and the branch `revision` if needed);
    returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get(TOKEN_ENV))
    api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(staging), repo_type=repo_type,
                             revision=revision, commit_message=message)
    return str(getattr(info, "commit_url", info))


def route_push(sft: dict, hub_model_id: str | None) -> tuple[dict, str | None]:
    """`sft` without TRL's own push (`push_to_hub`, `hub_model_id`), and the repository the merged
    checkpoint goes to instead: `hub_model_id`, else `sft.hub_model_id` when `sft.push_to_hub`."""
    sft = dict(sft)
    if sft.get("hub_token") is not None:
        raise ConfigError(f"config key 'sft.hub_token': a token does not belong in a config (it would be "
                          f"written to config.yaml and the manifest); set {TOKEN_ENV} in the environment")
    push = sft.pop("push_to_hub", False)
    sft_repo = sft.pop("hub_model_id", None)
    if hub_model_id:
        return sft, hub_model_id
    if push in (True, "true", "True", 1):
        if not sft_repo:
            raise ConfigError("config key 'sft.push_to_hub': set sft.hub_model_id (or train.hub_model_id) "
                              "to the model repository ORG/NAME the checkpoint goes to")
        return sft, sft_repo
    return sft, None
