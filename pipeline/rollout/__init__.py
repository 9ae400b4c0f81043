"""Generation engines and episodes. Every engine has one method:

    engine.generate(prompts: list[list[message]], *, n=1, max_tokens=256, temperature=1.0,
                    top_p=1.0, top_k=-1, seed=None, stop=None) -> list[list[str]]

returning n completions per chat prompt (the model's chat template applied).
TransformersEngine runs in process (tests, small measurements); the vLLM engine
in Ray actors serves batch work.
"""
