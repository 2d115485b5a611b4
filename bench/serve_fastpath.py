"""`chatbot serve` with the fast decoder step, for load tests before the server has a switch for it.

    python bench/serve_fastpath.py --checkpoint DIR --port 8001 [--quantize int8] [--reference]

Settings come from CHATBOT_* as for `chatbot serve` (CHATBOT_NUM_THREADS, CHATBOT_MAX_BATCH_SIZE,
...). The engine gets `model.fastpath.make_step(model, quantize)` as its step; `--reference`
keeps the reference step, so both can be loaded the same way. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--quantize", choices=("int8",))
    p.add_argument("--reference", action="store_true", help="the reference step instead")
    args = p.parse_args()

    import logging

    import uvicorn

    from app.engine import ChatEngine
    from app.main import create_app, engine_config
    from app.metrics import Metrics
    from app.settings import Settings
    from model.checkpoint import load_checkpoint
    from model.fastpath import make_step

    logging.basicConfig(level=logging.WARNING)
    settings = Settings(checkpoint=args.checkpoint, host="127.0.0.1", port=args.port)
    ckpt = load_checkpoint(args.checkpoint)
    step = None if args.reference else make_step(ckpt.model, quantize=args.quantize)
    engine = ChatEngine(ckpt, engine_config(settings), step=step, metrics=Metrics())
    print(f"serving {ckpt.name} with the {'reference' if args.reference else 'fast'} step"
          f"{' (int8)' if args.quantize else ''} on http://127.0.0.1:{args.port}", flush=True)
    uvicorn.run(create_app(settings, engine=engine), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
