"""Cost of a MAH-DPO step against dpo.train_layers, in one process (bare torch, no Ray):

    .venv/bin/python bench/dpo_layers.py <SFT model dir>

6 heads, 4 sequences of 200 tokens (80 prompt), fused AdamW, 2 threads; best of 2 repetitions x 2 timed
steps per setting, and the ratio to training every layer (measured in the same run). docs/policy.md.
"""
import time, torch, sys
from pipeline.models.multihead import MultiHeadPolicy
from pipeline.train.dpo_losses import dpo_loss
torch.set_num_threads(2)
path = sys.argv[1]
ids = torch.randint(0, 40000, (4, 200)); labels = ids.clone(); labels[:, :80] = -100
heads = torch.tensor([0, 1, 0, 1])
res = {}
for rep in range(2):
    for k in (0, 8, 4, 2):
        m = MultiHeadPolicy.from_sft(path, [f"o{i}" for i in range(6)], train_layers=k)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6, fused=True)
        ts = []
        for it in range(3):
            t = time.perf_counter()
            lp = m(input_ids=ids, attention_mask=torch.ones_like(ids), head_ids=heads, labels=labels).logps
            loss = dpo_loss(lp[:2], lp[2:], torch.zeros(2), torch.zeros(2), beta=0.1)[0].mean()
            loss.backward(); opt.step(); opt.zero_grad()
            ts.append(time.perf_counter() - t)
        res.setdefault(k, []).append(min(ts[1:]))
        print(k, [round(x, 2) for x in ts], flush=True)
for k, v in res.items():
    print(f"train_layers={k}: best {min(v):.2f} s per step of 4 x 200 tokens -> {800/min(v):.0f} tokens/s; ratio to all {min(res[0])/min(v):.2f}x")
