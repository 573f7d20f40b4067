"""Refit a checkpoint's codec, or only record its training items' fit-loss spread, without
meta-training again: the network is unchanged; the file, so its sha256, is rewritten in
place.

    python plugins/checkpoints/refit_codec.py CKPT FILE [FILE ...] --refine-steps N
    python plugins/checkpoints/refit_codec.py CKPT FILE [FILE ...] --experience-only

FILE: the checkpoint's training files (its ``info.data``; globs expanded).

* ``--refine-steps N``: ``fit_codec`` again, on the training items' codes after N refine
  steps (what ``meta-train --codec-refine-steps N`` does at the end of training); N becomes
  encode's default refinement. The shipped ``shapes_sdf.safetensors`` got its codec so.
* ``--experience-only``: keep the codec tables, add ``info.codec.fit_loss`` (the spread of
  the training items' losses after the meta-learned steps), from which `mscn fit/encode`
  warn about items far outside the checkpoint's experience (fit_codec records it itself
  since it exists). The default climate checkpoint got its record so.
"""

import argparse
import glob
import sys
import warnings

from mscn_core import pipeline as P
from mscn_core.checkpoint import load_checkpoint, save_checkpoint
from mscn_core.registry import get_modality


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("files", nargs="+")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--refine-steps", type=int)
    how.add_argument("--experience-only", action="store_true")
    args = ap.parse_args(argv)
    files = [f for a in args.files for f in sorted(glob.glob(a)) or [a]]
    ck = load_checkpoint(args.checkpoint)
    m = get_modality(ck.modality)
    m.load_state(ck.modality_state)
    with warnings.catch_warnings():  # the modality's options come with its loaded state
        warnings.simplefilter("ignore")
        signals = [m.to_signal(i) for f in files for i in m.read(f)]
    batch = getattr(m, "codec_batch_size", None) or P.CODEC_BATCH
    if args.experience_only:
        P.record_experience(ck, m, signals, P.adapt_codes(ck, m, signals, max_batch=batch),
                            max_batch=batch)
    else:
        P.fit_codec(ck, m, signals, refine_steps=args.refine_steps)
    save_checkpoint(ck, args.checkpoint, overwrite=True)
    print(args.checkpoint, ck.info["codec"], ck.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
