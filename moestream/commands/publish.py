"""Verify a bundle, write its model card (mlx-community conventions) and upload everything to the
Hugging Face Hub in one commit, so a failed upload leaves the repo as it was. Authentication is
the standard one (HF_TOKEN or `hf auth login`)."""

EXAMPLES = """examples:
  moestream publish bundles/q3 --repo me/Qwen3-30B-A3B-moestream-4bit --dry-run
  moestream publish bundles/q3 --repo me/Qwen3-30B-A3B-moestream-4bit --private"""


def add_arguments(p) -> None:
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--repo", required=True, help="ORG/NAME on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--dry-run", action="store_true", help="print the files and the card; upload nothing")
    p.add_argument("--revision", default=None, help="branch to commit to, created if missing (default: main)")
    p.add_argument("--license", default=None, help="license id for the card (default: the source's)")


def run(args) -> None:
    from moestream.stages.publish import publish_bundle

    result = publish_bundle(args.bundle, args.repo, private=args.private, create_pr=args.create_pr,
                            dry_run=args.dry_run, revision=args.revision, license=args.license)
    print(result.summary())
