"""cobra.py with the class-token attention factor of M_tran (Sec. 3.4, M_tran (x) A_obj) set to 1 at inference.

    python tests/bench/cobra_no_aobj.py --until seed --cobra-ckpt RUN/checkpoints/last.pt --out OUT [cobra.py flags]

Runs cobra.py's main() unchanged except that, in eval mode, the class-token row of the attention that the
network returns is replaced by ones, so the seeds use the bare ViT CAM. Training is untouched (with --cobra-ckpt
nothing trains). The README's CoBra section quotes it: is A_obj what makes the toy ViT seeds weak?
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cobra  # noqa: E402

_forward = cobra.CoBra.forward


def forward_without_a_obj(self, x):
    out = _forward(self, x)
    if not self.training and "vit_attn" in out:
        attn = out["vit_attn"].clone()  # (B, 1+hw, 1+hw)
        attn[:, 0, 1:] = 1.0  # a_obj = 1: M_tran (x) A_obj is M_tran
        out["vit_attn"] = attn
    return out


if __name__ == "__main__":
    cobra.CoBra.forward = forward_without_a_obj
    cobra.main(sys.argv[1:])
