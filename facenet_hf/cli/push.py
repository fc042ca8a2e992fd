"""``facenet-hf push``: publish a saved model folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``facenet-hf push MODEL_DIR REPO_ID``: publish a saved model folder to the Hugging Face Hub."""
    parser = argparse.ArgumentParser(
        prog="facenet-hf push",
        description="Upload a model folder (model.safetensors, config.json, README.md, PNG plots; never "
        "checkpoints) to a Hub repo, creating the repo (and the branch) if needed. Prints the commit URL.",
    )
    parser.add_argument("model_dir", help="folder written by FaceNet.save_pretrained (e.g. runs/x/model)")
    parser.add_argument("repo_id", help="Hub repo id, e.g. your-name/facenet-r18-lfw")
    parser.add_argument("--private", action="store_true", help="create the repo as private (a new repo only)")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--token", default=None, help="write token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    args = parser.parse_args(argv)

    from facenet_hf.hub import PushError, push_model

    try:
        url = push_model(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
        )
    except PushError as e:
        print(f"facenet-hf push: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0
