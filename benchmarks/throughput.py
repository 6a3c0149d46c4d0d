"""fp8lm vs transformers throughput on SmolLM2 (see fp8lm/eval/throughput.py); also `fp8lm bench throughput`."""
from fp8lm.eval.throughput import main

if __name__ == "__main__":
    main()
