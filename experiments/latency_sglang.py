"""Per-problem wall-clock latency and accuracy of APR and SoS+ served by SGLang (the paper's Fig. 6 protocol).

Every thread of the APR runtime (parents, children, continuations) is a request to the server; each problem
is solved alone, so its wall time is what a user waits; children of a spawn are sent concurrently and batched
by SGLang. Same options and outputs as ``experiments/latency.py`` (JSON + PNG), with ``--backend`` required:

    apr-jax export --ckpt runs/demo/sft_apr --out runs/hf_apr        # and the same for the SoS+ run
    python -m sglang.launch_server --model-path runs/hf_apr --port 30000 --context-length 4096 &
    python experiments/latency_sglang.py --backend http://127.0.0.1:30000 --sosp runs/demo/sft_sosp \\
        --apr runs/demo/sft_apr --contexts 1024,2048,4096 --problems 100 --out runs/latency_sglang

One server holds one model: serve the APR export and run with ``--apr`` only (``--out DIR_APR``), then serve
the SoS+ export and run with ``--sosp`` only (``--out DIR_SOSP``). The run folders supply the tokenizer and the validation problems; the weights
come from the server.
"""

import latency

if __name__ == "__main__":
    latency.main(require_backend=True)
