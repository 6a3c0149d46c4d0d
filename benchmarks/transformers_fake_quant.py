"""An independent reference for FP8 accuracy: per-tensor static W8A8 fake-quant of every nn.Linear
in transformers (torch's own float8 casts, scale = maxabs / 448, activation maxima from an fp8lm
measurement file), perplexity on fp8lm's held-out text in 512-token windows.

    python benchmarks/transformers_fake_quant.py CAL/inc_output_hooks_maxabs.json
"""
import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fp8lm.eval.perplexity import read_text
from fp8lm.model.registry import resolve_model


def qdq(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def perplexity(model, windows) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1]
            nll -= float(torch.log_softmax(logits, -1).gather(1, torch.tensor(w[1:])[:, None]).sum())
            n += len(w) - 1
    return math.exp(nll / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("measurement", help="an fp8lm/INC *_hooks_maxabs.json file")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    folder = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder).encode(read_text(None))
    windows = [ids[i:i + 512] for i in range(0, len(ids), 512)]
    nodes = json.load(open(args.measurement))["Nodes"]
    base = perplexity(model, windows)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # untie before editing
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            module.weight.data = qdq(w, float(w.abs().max()) / 448)
            s_in = nodes[name]["inputs"][0][0][0] / 448
            module.register_forward_pre_hook(lambda mod, a, s=s_in: (qdq(a[0], s),))
    fp8 = perplexity(model, windows)
    print(f"transformers fake-quant W8A8 (per tensor, maxabs/448): perplexity {base:.4f} -> {fp8:.4f} "
          f"({100 * (fp8 / base - 1):+.2f}%)")


if __name__ == "__main__":
    main()
