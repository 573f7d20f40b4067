"""Add the training items' fit-loss spread (``info.codec.fit_loss``) to a checkpoint fitted
before the record existed: what `mscn fit/encode` compares a new item with to warn that it
is far outside the checkpoint's experience (mscn_core.pipeline.unfamiliar). A fresh
`meta-train` records it itself (fit_codec), on the same items and codes as here.

    python plugins/checkpoints/record_experience.py CKPT FILE [FILE ...]

FILE: the checkpoint's training files (its ``info.data``; globs expanded). The network
and codec tables are unchanged; the file, so its sha256, is rewritten in place.
"""

import glob
import sys
import warnings

from mscn_core import pipeline as P
from mscn_core.checkpoint import load_checkpoint, save_checkpoint
from mscn_core.registry import get_modality


def main(argv: list[str]) -> int:
    path, files = argv[0], [f for a in argv[1:] for f in sorted(glob.glob(a)) or [a]]
    ck = load_checkpoint(path)
    m = get_modality(ck.modality)
    m.load_state(ck.modality_state)
    with warnings.catch_warnings():  # the modality's options come with its loaded state
        warnings.simplefilter("ignore")
        signals = [m.to_signal(i) for f in files for i in m.read(f)]
    batch = getattr(m, "codec_batch_size", None) or P.CODEC_BATCH
    codes = P.adapt_codes(ck, m, signals, max_batch=batch)
    P.record_experience(ck, P.fit_losses(ck, m, signals, codes, max_batch=batch))
    save_checkpoint(ck, path, overwrite=True)
    print(path, ck.info["codec"]["fit_loss"], ck.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
