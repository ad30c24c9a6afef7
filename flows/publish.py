"""The publish flow: verify -> model card -> one commit to the Hub, with a summary artifact.

Orchestration only; the work is in stages/publish.py and stages/card.py. No task retries: a
failed commit changed nothing and says what to do, and retrying a commit whose answer was lost
could commit twice. The flow takes no token parameter on purpose: Prefect records flow and task
parameters in its database, so credentials come from HF_TOKEN or `hf auth login` only.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from ..manifests.open import open_bundle
from ..stages.card import fmt_size
from ..stages.publish import (
    PublishResult,
    check_bundle,
    check_options,
    commit_plan,
    dry_run_result,
    format_plan,
    plan_upload,
)


@task(name="verify-bundle")
def verify_task(bundle: str) -> dict:
    verified = check_bundle(bundle)
    get_run_logger().info("%s: structure and every checksum OK (%d experts in %d layers)", bundle,
                          len(verified.extents), len(verified.layers))
    return {"family": verified.family, "expert_bytes": verified.expert_bytes}


@task(name="model-card")
def card_task(bundle: str, repo_id: str, license: str | None) -> str:
    # Structure only: verify_task has just checked every checksum.
    return plan_upload(open_bundle(bundle), repo_id, license=license).card


@task(name="commit")
def commit_task(bundle: str, repo_id: str, card: str, private: bool, create_pr: bool, revision: str | None,
                dry_run: bool, license: str | None) -> PublishResult:
    plan = plan_upload(open_bundle(bundle), repo_id, license=license)
    if plan.card != card:  # the bundle changed between the tasks
        raise RuntimeError(f"{bundle} changed while publishing; run the flow again")
    if dry_run:
        print(format_plan(plan, private=private, create_pr=create_pr, revision=revision, token=None))
        return dry_run_result(plan, private=private, revision=revision)
    return commit_plan(plan, private=private, create_pr=create_pr, revision=revision)


def summary_markdown(result: PublishResult) -> str:
    head = "dry run, nothing uploaded" if result.dry_run else f"commit `{result.commit}`"
    lines = [
        f"# moestream publish: [{result.repo_id}]({result.url})",
        f"- {head} on `{result.revision}`" + (f", pull request: {result.pr_url}" if result.pr_url else ""),
        f"- {len(result.files)} files, {fmt_size(result.total_bytes)}",
        "",
        "| file | bytes |",
        "|---|---|",
        *(f"| `{path}` | {size:,} |" for path, size in result.files),
    ]
    return "\n".join(lines)


@flow(name="publish-bundle", log_prints=True)
def publish_bundle_flow(bundle: str, repo_id: str, private: bool = False, create_pr: bool = False,
                        dry_run: bool = False, revision: str | None = None, license: str | None = None) -> dict:
    bundle = str(Path(bundle).absolute())
    check_options(repo_id, create_pr=create_pr, revision=revision)  # before minutes of hashing
    verify_task(bundle)
    card = card_task(bundle, repo_id, license)
    result = commit_task(bundle, repo_id, card, private, create_pr, revision, dry_run, license)
    create_markdown_artifact(markdown=summary_markdown(result), key="bundle-publish",
                             description="moestream bundle published to the Hub")
    print(result.summary())
    return {"repo_id": result.repo_id, "url": result.url, "commit": result.commit, "commit_url": result.commit_url,
            "pr_url": result.pr_url, "dry_run": result.dry_run, "files": len(result.files),
            "total_bytes": result.total_bytes}
