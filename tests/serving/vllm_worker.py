"""Runs in the serving venv (.venv-vllm): greedy tokens of vllm.LLM for a model folder.

    .venv-vllm/bin/python tests/serving/vllm_worker.py JOB.json OUT.json

JOB: {"model": folder, "prompts": [[ids]...], "max_tokens": n, "enforce_eager": bool,
"max_num_batched_tokens": n}. All prompts go to one generate() call, so vLLM batches them
continuously; a small token budget makes it chunk the longer prefills. OUT: {"tokens": [...],
"enforce_eager": what the engine ran with, "architecture": the class vLLM resolved}.
"""

import json
import sys


def main() -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(open(sys.argv[1]).read())
    llm = LLM(model=job["model"], dtype="float32", max_model_len=128, seed=0, gpu_memory_utilization=0.2,
              enforce_eager=job.get("enforce_eager", False), max_num_batched_tokens=job.get("max_num_batched_tokens", 16),
              max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
    config = llm.llm_engine.vllm_config
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "enforce_eager": config.model_config.enforce_eager,
              "architecture": getattr(config.model_config, "architecture", None)}
    open(sys.argv[2], "w").write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
