"""Steerable decoding: per-request weights in one batch, PRM-guided decoding with a continuing cache."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.decoding.guided import guided_generate
from pipeline.decoding.mixing import generate, mix_strategy
from pipeline.models.checkpoint import load_tokenizer
from pipeline.models.multihead import MultiHeadPolicy


def _prompt_ids(tok, text):
    s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(s, add_special_tokens=False)["input_ids"]


def test_weights_move_the_output_and_requests_with_different_weights_share_a_batch(steerable_policy):
    path, a, b = steerable_policy
    policy, tok = MultiHeadPolicy.load(path).eval(), load_tokenizer(path)
    kw = {"max_new_tokens": 3, "eos_ids": {tok.eos_token_id}, "pad_id": tok.pad_token_id}
    p1, p2 = _prompt_ids(tok, "What is 2 + 3?"), _prompt_ids(tok, "Say hello to the whole team today.")
    weights = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.5, 0.5]])
    batch = generate(policy, [p1, p2, p1], weights, **kw)  # different lengths: left padding
    assert tok.decode(batch[0][:1]) == a and tok.decode(batch[1][:1]) == b
    for i, p in enumerate([p1, p2, p1]):  # each row is what it would be alone
        assert batch[i] == generate(policy, [p], weights[i:i + 1], **kw)[0]
    # merged heads (built once per weight vector) and the per-token mix of the H heads agree
    free = dict(kw, max_new_tokens=8)
    plain = MultiHeadPolicy.from_sft(path, ["x", "y"], noise_std=0.3).eval()
    assert (generate(plain, [p1, p2, p1], weights, strategy="merged", **free)
            == generate(plain, [p1, p2, p1], weights, strategy="per_token", **free))
    # per token, decoding reads every head it projects on: U merged heads or the H heads in use
    assert mix_strategy(1, 3, 100, 1000) == "merged" and mix_strategy(3, 3, 100, 1000) == "merged"
    assert mix_strategy(8, 3, 100, 10_000) == "per_token"  # every request its own weights
    assert mix_strategy(2, 3, 100, 150) == "per_token"  # over the memory budget


class PreferLongest:
    """A stand-in PRM with a known preference (the longest candidate wins), recording what it
    was asked, so the test can check the search keeps the candidate the PRM prefers."""

    objectives = ["accuracy"]

    def __init__(self):
        self.calls = []

    def score_last(self, tok, prompt, prefix, candidates, max_length=4096):
        self.calls.append((list(prefix), list(candidates)))
        return torch.tensor([[float(len(c))] for c in candidates])

    def to_rewards(self, raw):  # onto [0, 1], keeping the order (a sigmoid would tie long candidates at 1.0)
        return raw / 1000


def test_guided_decoding_keeps_the_candidate_the_prm_prefers(tiny_model_dir):
    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["accuracy", "engagement"], noise_std=0.05).eval()
    tok = load_tokenizer(tiny_model_dir)
    prm = PreferLongest()
    r = guided_generate(policy, tok, prm, None, [{"role": "user", "content": "Count to five."}], weights=[0.5, 0.5],
                        prm_weights=[1.0], candidates=4, max_steps=3, max_step_tokens=8, boundary="sentences",
                        temperature=1.0, seed=3)
    assert len(prm.calls) == len(r.steps) >= 2
    for step, (prefix, cands) in zip(r.steps, prm.calls):
        assert len(cands) == 4 and step == max(cands, key=len)
    assert prm.calls[1][0] == r.steps[:1]  # the PRM sees the accepted steps as the prefix


def test_prm_prefix_cache_scores_as_a_full_forward(tiny_model_dir):
    from pipeline.decoding.guided import PRMPrefix
    from pipeline.models.prm import build_prm

    prm, ptok = build_prm(tiny_model_dir, ["accuracy", "engagement"], {"accuracy": "soft", "engagement": "hard"})
    torch.nn.init.normal_(prm.head.weight, std=1.0)  # rewards far from zero, so a mismatch shows
    prm.eval()
    prompt = [{"role": "user", "content": "What is 4 + 4?"}]
    cache, accepted = PRMPrefix(prm, ptok, prompt), []
    for cands in (["First, 4 + 4 = 8.", "Hmm.", "Let us add the two numbers together carefully."],
                  ["So the answer is 8.", "It is 9."]):
        fast = cache.score(cands)
        full = prm.score_last(ptok, prompt, accepted, cands)
        assert fast.shape == (len(cands), 2) and torch.allclose(fast, full, atol=1e-4), (fast, full)
        cache.accept(2 if len(cands) == 3 else 0)  # the longest first: its padding must not linger
        accepted.append(cands[2] if len(cands) == 3 else cands[0])


def test_continuing_cache_matches_reencoding_token_for_token(tiny_model_dir):
    from pipeline.models.prm import build_prm

    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["accuracy", "engagement"], noise_std=0.05).eval()
    tok = load_tokenizer(tiny_model_dir)
    prm, ptok = build_prm(tiny_model_dir, ["accuracy"], {"accuracy": "soft"})
    prm.eval()
    kw = dict(weights=[0.3, 0.7], prm_weights=[1.0], candidates=3, max_steps=4, max_step_tokens=10,
              boundary="sentences", seed=5)
    for temperature in (0.0, 1.0):
        cont = guided_generate(policy, tok, prm, ptok, [{"role": "user", "content": "What is 4 + 4?"}],
                               temperature=temperature, **kw)
        again = guided_generate(policy, tok, prm, ptok, [{"role": "user", "content": "What is 4 + 4?"}],
                                temperature=temperature, reencode=True, **kw)
        assert cont.token_ids == again.token_ids and len(cont.token_ids) > 10
        assert cont.policy_forward_tokens < again.policy_forward_tokens  # the cache saved the re-encoding


def test_candidates_on_a_shared_prefix_compute_what_each_would_alone(tiny_model_dir):
    """Tree attention: three candidates fed interleaved onto one batch-1 cache (the prefix held once)
    get the logits that each gets on its own prefix + tokens; keep() leaves exactly the winner's cache."""
    from transformers import DynamicCache

    from pipeline.decoding.guided import SharedPrefix

    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["a"]).eval()
    run = lambda ids, **kw: policy(torch.tensor([ids]), head_ids=0, **kw).logits[0]  # noqa: E731
    prefix, cands = [5, 9, 17, 3, 40], [[7, 8, 9], [11], [12, 13]]
    with torch.no_grad():
        cache = DynamicCache()
        run(prefix, past_key_values=cache, use_cache=True)
        tree, got = SharedPrefix(cache), {i: [] for i in range(3)}
        # first step: every candidate's first token at once; then candidates 0 and 2 two tokens in one forward
        for owners, ids in (([0, 1, 2], [7, 11, 12]), ([0, 0, 2], [8, 9, 13])):
            pos, mask = tree.append(owners, dtype=policy.heads.dtype)
            out = run(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            for o, row in zip(owners, out):
                got[o].append(row)
        assert cache.layers[0].keys.shape[0] == 1 and cache.get_seq_length() == len(prefix) + 6
        for i, toks in enumerate(cands):
            alone = run(prefix + toks)[len(prefix):]
            assert torch.allclose(torch.stack(got[i]), alone, atol=1e-4), i
        tree.keep(2)
        assert cache.get_seq_length() == len(prefix) + 2
        nxt = run([21], position_ids=torch.tensor([[len(prefix) + 2]]), past_key_values=cache, use_cache=True)
        assert torch.allclose(nxt[-1], run(prefix + cands[2] + [21])[-1], atol=1e-4)


def test_guided_decoding_refuses_an_attention_without_4d_masks(tiny_model_dir):
    import pytest

    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["a"]).eval()
    policy.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*'sdpa'"):
        guided_generate(policy, load_tokenizer(tiny_model_dir), PreferLongest(), None,
                        [{"role": "user", "content": "Hi."}], weights=[1.0], prm_weights=[1.0])


def test_screened_tokens_are_the_exact_float32_tokens():
    """The bf16 pass only short-lists tokens; the winner is the float32 one, also in near-ties the
    bf16 pass alone gets wrong (rows 0 and 1 differ by 1e-3, below bf16's resolution)."""
    from pipeline.decoding.mixing import screen_copy, screened_tokens

    torch.manual_seed(0)
    M, V, D, B = 3, 400, 64, 64
    u = torch.randn(D)
    W = torch.randn(M, V, D) * 0.1
    W[:, 0] = u
    W[:, 1] = u + 1e-3 * torch.randn(M, D)
    h = u + 0.05 * torch.randn(B, D)
    coef = torch.rand(B, M)
    exact = sum(coef[:, m, None] * (h @ W[m].T) for m in range(M))
    low, norms = screen_copy(W)
    bf16_only = sum(coef[:, m, None] * (h.bfloat16() @ low[m].T).float() for m in range(M))
    assert (bf16_only.argmax(-1) != exact.argmax(-1)).any()  # the short list's exact step matters
    assert torch.equal(screened_tokens(h, W, coef, low, norms, 0.0, None), exact.argmax(-1))
    for temperature in (0.7, 1.0):
        got = screened_tokens(h, W, coef, low, norms, temperature, torch.Generator().manual_seed(3))
        gumbel = -torch.empty(B, V).exponential_(generator=torch.Generator().manual_seed(3)).log()
        assert torch.equal(got, (exact / temperature + gumbel).argmax(-1))
    one_hot = torch.nn.functional.one_hot(torch.arange(B) % M, M).float()  # merged heads: a row reads one
    exact1 = sum(one_hot[:, m, None] * (h @ W[m].T) for m in range(M))
    assert torch.equal(screened_tokens(h, W, one_hot, low, norms, 0.0, None), exact1.argmax(-1))


def test_screened_copy_of_the_heads_is_made_once_per_model(tiny_model_dir, monkeypatch):
    """Batches with their own mixes reuse the policy's bf16 copy; new head weights get a new one."""
    from pipeline.decoding import mixing

    monkeypatch.setenv("MAHALO_BF16", "1")  # screening runs only where bf16 is fast; forced on to test it anywhere
    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["a", "b", "c"], noise_std=0.05).eval()
    tok = load_tokenizer(tiny_model_dir)
    made, real = [], mixing.screen_copy
    monkeypatch.setattr(mixing, "screen_copy", lambda W: made.append(W.shape) or real(W))
    kw = dict(max_new_tokens=3, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id, strategy="per_token")
    prompts = [_prompt_ids(tok, "Hi."), _prompt_ids(tok, "Count.")]
    for _ in range(2):
        generate(policy, prompts, torch.rand(2, 3), **kw)
    assert len(made) == 1
    with torch.no_grad():
        policy.heads.add_(0.01)  # the heads changed: the copy is remade
    generate(policy, prompts, torch.rand(2, 3), **kw)
    assert len(made) == 2


def _hard_and_soft_prm(tiny_model_dir, prompt, cands):
    """A PRM with a soft objective (acc) and a hard one (eng, a logit) whose head is set by hand so
    that on cands = [A, B]: raw A = (acc 0, eng logit 4), raw B = (acc 1, eng logit 1). By the raw sum A
    wins (4 > 2: the logit dominates); by the mean of rewards B does ((1 + 0.73) / 2 > (0 + 0.98) / 2)."""
    from pipeline.models.prm import build_prm, encode_steps

    prm, ptok = build_prm(tiny_model_dir, ["acc", "eng"], {"acc": "soft", "eng": "hard"})
    prm.eval()
    with torch.no_grad():
        h = []
        for c in cands:  # the hidden state the head reads at each candidate's separator
            enc = encode_steps(ptok, prompt, [c], prm.sep_id, 256)
            h.append(prm.backbone(input_ids=torch.tensor([enc["input_ids"]])).last_hidden_state[0, enc["positions"][-1]])
        d = h[0] - h[1]
        unit = d / d.dot(d)  # unit . (h_A - h_B) = 1
        for j, (gap, at_b) in enumerate([(-1.0, 1.0), (3.0, 1.0)]):  # (A - B, B) per objective
            prm.head.weight[j] = gap * unit
            prm.head.bias[j] = at_b - gap * unit.dot(h[1])
    return prm, ptok


def test_hard_and_soft_prm_ranks_by_the_weighted_mean_of_rewards(tiny_model_dir, tmp_path):
    """Issue 17: guided decoding and pair selection compare objectives on the PRM's common scale
    (hard: sigmoid of the logit; soft: the value), not the raw outputs where a logit head dominates."""
    import pyarrow as pa

    from pipeline.decoding.guided import PRMPrefix, combine
    from pipeline.models.prm import PRMScorer
    from pipeline.rollout.pairs import prm_response_scores, select_pairs
    from pipeline.train.mahdpo import modpo_terms

    prompt = [{"role": "user", "content": "What is 4 + 4?"}]
    cands = ["Four and four make eight.", "It is 8."]
    prm, ptok = _hard_and_soft_prm(tiny_model_dir, prompt, cands)
    raw = prm.score_last(ptok, prompt, [], cands)
    assert torch.allclose(raw, torch.tensor([[0.0, 4.0], [1.0, 1.0]]), atol=1e-3)
    s = torch.sigmoid(torch.tensor([4.0, 1.0]))
    want = torch.tensor([(0.0 + s[0]) / 2, (1.0 + s[1]) / 2])
    assert int(torch.argmax(combine(raw, [0.5, 0.5]))) == 0  # the raw mix: the logit alone decides
    # guided decoding, both scoring paths: the weighted mean of the rewards picks B
    for rewards in (prm.rewards_last(ptok, prompt, [], cands), prm.to_rewards(PRMPrefix(prm, ptok, prompt).score(cands))):
        scores = combine(rewards, [0.5, 0.5])
        assert torch.allclose(scores, want, atol=1e-3) and int(torch.argmax(scores)) == 1

    # guided_generate itself maps the PRM's raw outputs before mixing (a stand-in returning these raw rows)
    class Fixed:
        objectives, label_kinds, to_rewards = prm.objectives, prm.label_kinds, prm.to_rewards
        seen = []

        def score_last(self, tok, prompt, prefix, candidates, max_length=4096):
            self.seen.append(list(candidates))
            return torch.tensor([[0.0, 4.0], [1.0, 1.0], [0.0, 4.0]])

    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["acc", "eng"], noise_std=0.05).eval()
    fixed = Fixed()
    r = guided_generate(policy, load_tokenizer(tiny_model_dir), fixed, None, prompt, weights=[0.5, 0.5],
                        prm_weights=[0.5, 0.5], candidates=3, max_steps=1, max_step_tokens=6, temperature=1.0, seed=1)
    assert r.steps == [fixed.seen[0][1]] and r.step_scores[0] == pytest.approx(float(want[1]), abs=1e-6)

    # pair selection: PRMScorer writes rewards; margins and MODPO's cross-objective margins are on [0, 1]
    prm.save(tmp_path / "prm", tokenizer=ptok)
    table = pa.Table.from_pylist([{"prompt": json.dumps(prompt), "steps": [c]} for c in cands])
    rows = PRMScorer(str(tmp_path / "prm"))(table).to_pylist()
    cand_rows = [{"problem_id": "p", "task": "t", "prompt": json.dumps(prompt), "candidate": k, "response": c,
                  "step_rewards": r["step_rewards"]} for k, (c, r) in enumerate(zip(cands, rows))]
    scores = {o: prm_response_scores(cand_rows, j, "last", "test") for j, o in enumerate(prm.objectives)}
    assert scores["acc"] == pytest.approx([0.0, 1.0], abs=1e-3) and scores["eng"] == pytest.approx(s.tolist(), abs=1e-3)
    pairs, skipped = select_pairs(cand_rows, scores, {"t": ["acc", "eng"]}, min_margin=0.3)
    # eng: rewards 0.98 vs 0.73 miss the margin (its raw logits, 4 vs 1, would pass)
    assert [p["objective"] for p in pairs] == ["acc"] and skipped == {"eng/margin": 1}
    assert pairs[0]["chosen"] == cands[1]
    modpo_terms(pairs, {"acc": 0.5, "eng": 0.5})
    assert pairs[0]["modpo_margin"] == pytest.approx(0.5 * float(s[1] - s[0]), abs=1e-3)  # raw: 0.5 * (1 - 4)
    stale = [dict(cand_rows[0], step_rewards=[[0.0, 4.0]])]  # a cache written in raw units
    with pytest.raises(ValueError, match="outside \\[0, 1\\].*delete the file"):
        prm_response_scores(stale, 1, "last", "_candidates.parquet")


def test_combine_refuses_weights_that_select_nothing():
    from pipeline.decoding.guided import combine

    r = torch.tensor([[0.2, float("nan")], [0.4, 0.9]])
    assert combine(r, [1.0, 0.0]).tolist() == pytest.approx([0.2, 0.4])  # a weight-0 objective is not read
    assert combine(r, [1.0, 1.0])[0] == float("-inf")  # a NaN that counts ranks last
    for bad in ([0.0, 0.0], [1.0], [1.0, -1.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="prm_weights"):
            combine(r, bad)


def test_bf16_screening_follows_the_device(monkeypatch):
    """The bf16 screening pass is skipped where bf16 has no hardware units (100x slower there)."""
    from pipeline.decoding.mixing import can_screen

    W = torch.zeros(2, 8, 4)
    monkeypatch.setenv("MAHALO_BF16", "0")
    assert not can_screen(W, 1.0)
    monkeypatch.setenv("MAHALO_BF16", "1")
    assert can_screen(W, 1.0)


def _record(engine):
    """Wraps engine.sample_tokens to keep each round's prompts and samples."""
    calls = []
    inner = engine.sample_tokens

    def sample_tokens(ids, **kw):
        out = inner(ids, **kw)
        calls.append((ids, out, kw))
        return out

    engine.sample_tokens = sample_tokens
    return calls


def _check_choices_against_the_reference(results, calls, prompts, prm, ptok, tok, weights, k, boundary, eos):
    """Replays every round: the step each problem kept is the one both of guided_generate's scorers
    (score_last, and PRMPrefix's continuing cache) rank first among the same candidates."""
    from pipeline.decoding.guided import PRMPrefix, combine
    from pipeline.decoding.guided_search import cut_step
    from pipeline.models.tokenize import prompt_ids

    heads = [prompt_ids(tok, p) for p in prompts]
    caches = [PRMPrefix(prm, ptok, p) for p in prompts]
    accepted = [[] for _ in prompts]
    ids_so_far = [[] for _ in prompts]
    for ids, samples, kw in calls:
        budgets = kw["max_tokens"]
        for row, outs, budget in zip(ids, samples, budgets):
            i = next(j for j in range(len(prompts)) if heads[j] + ids_so_far[j] == row)
            steps = [cut_step(tok, s, boundary, eos, budget) for s in outs]
            texts = [tok.decode([x for x in s if x not in eos]).strip() for s in steps]
            assert len(texts) == k
            ref = combine(prm.to_rewards(prm.score_last(ptok, prompts[i], accepted[i], texts)), weights)
            cached = combine(prm.to_rewards(caches[i].score(texts)), weights)
            best = int(torch.argmax(ref))
            assert int(torch.argmax(cached)) == best
            caches[i].accept(best)
            assert results[i].steps[len(accepted[i])] == texts[best]
            accepted[i].append(texts[best])
            ids_so_far[i] += steps[best]
    for i, r in enumerate(results):
        assert r.steps == accepted[i]
        want = ids_so_far[i][:-1] if r.finished else ids_so_far[i]
        assert r.token_ids == want


@pytest.mark.parametrize("boundary,prm_cache", [("sentences", True), ("blank_lines", True), ("sentences", False)])
def test_guided_search_keeps_the_candidates_guided_generate_would_keep(tiny_model_dir, boundary, prm_cache):
    """The batched step search (transformers engine, 3 problems at once) keeps, at every round, the
    candidate that guided_generate's scoring ranks first among the same candidates."""
    from pipeline.decoding.guided_search import guided_search
    from pipeline.engines.hf_engine import TransformersEngine
    from pipeline.models.prm import build_prm

    engine = TransformersEngine(tiny_model_dir, dtype="float32")
    prm, ptok = build_prm(tiny_model_dir, ["a", "b"], {"a": "soft", "b": "hard"})
    prm.eval()
    prompts = [[{"role": "user", "content": q}] for q in ("Count to five.", "What is 4 + 4?", "Name a colour.")]
    calls = _record(engine)
    weights = [0.3, 0.7]
    res = guided_search(engine, prm, ptok, prompts, prm_weights=weights, candidates=3, max_steps=3,
                        max_step_tokens=6, max_new_tokens=16, boundary=boundary, temperature=1.0, seeds=[1, 2, 3],
                        prm_cache=prm_cache)
    assert len(calls) >= 2 and all(len(r.steps) >= 1 for r in res)
    _check_choices_against_the_reference(res, calls, prompts, prm, ptok, engine.tokenizer, weights, 3, boundary,
                                         engine.eos_ids())


def test_cut_step_ends_where_guided_generate_ends_a_step(tiny_model_dir):
    from pipeline.decoding.guided import _at_boundary
    from pipeline.decoding.guided_search import cut_step
    from pipeline.models.checkpoint import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ids = tok("First we add 2 and 3. Then\n\nwe get 5", add_special_tokens=False)["input_ids"]
    for boundary in ("sentences", "blank_lines", "turn"):
        got = cut_step(tok, ids, boundary, eos={10**9}, budget=len(ids))
        # the shortest prefix that shows the boundary, else everything
        want = next((ids[:j] for j in range(1, len(ids) + 1) if _at_boundary(tok.decode(ids[:j]), boundary)), ids)
        assert got == want
        assert boundary == "turn" or len(got) < len(ids)
    assert cut_step(tok, ids, "turn", eos={ids[2]}, budget=99) == ids[:3]  # through the end of sequence
    assert cut_step(tok, ids, "turn", eos=set(), budget=4) == ids[:4]


def test_guided_search_on_vllm_matches_the_reference_choices(vllm_engine, tiny_model_dir):
    """The same check on the vLLM engine (the evaluation's backend): candidates from vLLM, choices
    as guided_generate's scorers make them; the stop hints never end a step before its boundary."""
    from pipeline.decoding.guided_search import guided_search
    from pipeline.models.prm import build_prm

    prm, ptok = build_prm(tiny_model_dir, ["a", "b"], {"a": "soft", "b": "hard"})
    prm.eval()
    prompts = [[{"role": "user", "content": q}] for q in ("Count to five.", "What is 4 + 4?", "Name a colour.")]
    calls = _record(vllm_engine)
    try:
        res = guided_search(vllm_engine, prm, ptok, prompts, prm_weights=[0.5, 0.5], candidates=3, max_steps=3,
                            max_step_tokens=6, max_new_tokens=16, boundary="sentences", temperature=1.0,
                            seeds=[1, 2, 3])
    finally:
        del vllm_engine.sample_tokens  # the instance attribute: back to the class's method
    _check_choices_against_the_reference(res, calls, prompts, prm, ptok, vllm_engine.tokenizer, [0.5, 0.5], 3,
                                         "sentences", vllm_engine.eos_ids())
