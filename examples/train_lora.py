"""Train a fresh LoRA with peftc, then save it as a PEFT checkpoint.

    python examples/train_lora.py                       # writes out/trained-lora
    python examples/train_lora.py my-lora --steps 50

peftc compiles the spec onto the built-in `tiny-llama` with train=True: the result is a plain
torch.fx GraphModule in which only the LoRA tensors require grad. A few AdamW steps on a fixed batch of
random tokens (next-token loss) show the loss going down; the adapter is then written with
`peftc.save_adapter` in the layout peft's `PeftModel.from_pretrained` and transformers' `load_adapter`
read. This script does not need peft.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import peftc  # noqa: E402

MODEL = "tiny-llama"
SPEC = """
adapter default: lora(r = 8, alpha = 16, dropout = 0.05) {
    targets q_proj, k_proj, v_proj, o_proj
}
"""


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(steps: int = 30, lr: float = 1e-2, batch: int = 8, seq: int = 32, seed: int = 0,
          spec: str = SPEC, log=print) -> tuple[torch.fx.GraphModule, list[float]]:
    """Compile `spec` onto tiny-llama for training and run `steps` AdamW steps. Returns (gm, losses)."""
    torch.manual_seed(seed)
    gm = peftc.compile(spec, MODEL, train=True)           # gm is in training mode: LoRA dropout is on
    params = [p for p in gm.parameters() if p.requires_grad]
    frozen = sum(p.numel() for p in gm.parameters() if not p.requires_grad)
    log(f"trainable: {len(params)} tensors, {sum(p.numel() for p in params):,} values; frozen: {frozen:,}")

    vocab = 320                                           # tiny-llama's vocabulary
    ids = torch.randint(0, vocab, (batch, seq))           # one fixed batch: the loss must fall as it is learned
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(1, steps + 1):
        out = gm(input_ids=ids, attention_mask=mask)      # a dict of tensors: {"logits": ...}
        loss = next_token_loss(out["logits"], ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 1 or step % 10 == 0 or step == steps:
            log(f"step {step:3d}  loss {loss.item():.4f}")
    gm.eval()                                             # dropout off from here on
    return gm, losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train a LoRA compiled by peftc and save it as a PEFT checkpoint.")
    ap.add_argument("out", nargs="?", default="out/trained-lora", help="output folder (default out/trained-lora)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)

    gm, losses = train(args.steps, args.lr)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    folder = peftc.save_adapter(gm, args.out)[0]
    print(f"saved {', '.join(sorted(p.name for p in Path(folder).iterdir()))} to {folder}")
    print(f"""
Load it with peft (on the same base model: peftc's built-in tiny-llama):

    from peft import PeftModel
    from peftc.builtin_models import BUILTINS
    base = BUILTINS["tiny-llama"][0]()
    model = PeftModel.from_pretrained(base, "{folder}")      # or: base.load_adapter("{folder}")

or compile it again with peftc:  adapter default: import "{folder}"
""")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
