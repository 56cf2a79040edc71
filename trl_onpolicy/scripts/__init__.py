"""Recipe-driven training entry points: `trl-onpolicy train|dpo|simpo --config recipe.yaml` (also `scripts/*.py`,
launchable with `accelerate launch` or `torchrun`). Each module exposes ``main(argv: list[str] | None) -> int``."""
