"""A BERT-style encoder on CPU: exact=True against exact=False, tol=0.05.

The target: at N=8192, at least 3x faster than exact=True with an output error under 0.05.

    python benchmarks/approx_model.py [N] [QK_SCALE]

QK_SCALE (default 1) multiplies the query and key projections' weights: random weights give nearly
uniform attention, where random features approximate well; 4 makes the heads sharper.
"""

import copy
import sys
import time
import warnings

import torch
from transformers import BertConfig, BertModel

import attnopt

torch.manual_seed(0)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
cfg = BertConfig(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=2,
                 max_position_embeddings=N, attn_implementation="eager")
model = BertModel(cfg, add_pooling_layer=False).eval()
QK_SCALE = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
with torch.no_grad():
    for layer in model.encoder.layer:
        layer.attention.self.query.weight.mul_(QK_SCALE)
        layer.attention.self.key.weight.mul_(QK_SCALE)
ids = torch.randint(0, cfg.vocab_size, (1, N))
mask = torch.ones(1, N, dtype=torch.long)
mask[:, N - N // 16:] = 0
with torch.no_grad():
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state

def timed(m):
    with torch.no_grad():
        t0 = time.perf_counter(); out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        first = time.perf_counter() - t0
        ts = []
        for _ in range(3):
            t0 = time.perf_counter(); out = m(input_ids=ids, attention_mask=mask).last_hidden_state
            ts.append(time.perf_counter() - t0)
    return out, first, sorted(ts)[1]

_, _, t_eager = timed(model)
exact = attnopt.optimize(copy.deepcopy(model), exact=True)
out_e, first_e, t_exact = timed(exact)
approx = attnopt.optimize(copy.deepcopy(model), exact=False, tol=0.05)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out_a, first_a, t_approx = timed(approx)
valid = mask[0].bool()
err = ((out_a - want)[:, valid].norm() / want[:, valid].norm()).item()
err_all = ((out_a - want).norm() / want.norm()).item()
print(f"N={N} qk scale {QK_SCALE:g}: eager {t_eager*1e3:.0f} ms; exact=True {t_exact*1e3:.0f} ms (first call {first_e:.1f} s); "
      f"exact=False tol=0.05 {t_approx*1e3:.0f} ms (first call {first_a:.1f} s); speedup {t_exact/t_approx:.2f}x; "
      f"output error {err_all:.4f} (kept tokens {err:.4f})")
print(exact.attnopt_report)
print(approx.attnopt_report)
for w in caught:
    print("WARNING:", w.category.__name__, w.message)
