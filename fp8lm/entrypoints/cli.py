"""The `fp8lm` command. Each subcommand is a thin layer over the Python API."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from fp8lm.entrypoints.openai.limits import ServerLimits
from fp8lm.entrypoints.openai.tool_parsers import TOOL_PARSERS
from fp8lm.errors import FP8LMError

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
]
# The demo calibrates on a quarter of `fp8lm calibrate`'s default text (16,384 tokens), so that the
# whole flow fits in about two minutes; its last line says what that costs on held-out text.
DEMO_STATISTICS_TOKENS = 4096


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model, and one flag per engine option (EngineConfig's fields, their help and defaults)."""
    from fp8lm.engine.config import EngineConfig
    from fp8lm.model.registry import KNOWN_MODELS

    p.add_argument("model", help=f"alias ({', '.join(KNOWN_MODELS)}), HF-style folder or .gguf file")
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        if kind.startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            value_type = str if "str" in kind else int if kind.startswith("int") else float
            p.add_argument(flag, type=value_type, default=f.default, help=f.metadata["help"])


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default="builtin", help="text file to score (default: fp8lm's held-out text)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-windows", type=int, default=None)


def engine_kwargs(args: argparse.Namespace) -> dict:
    from fp8lm.engine.config import ENGINE_OPTIONS

    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


def cmd_pull(args: argparse.Namespace) -> int:
    from fp8lm.model.registry import pull

    print(pull(args.alias))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fp8lm import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(out.outputs[0].text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole flow on SmolLM2: calibrate -> quantize -> generate in both precisions -> compare."""
    import tempfile

    from fp8lm import LLM, SamplingParams
    from fp8lm.entrypoints.calibrate import calibrate
    from fp8lm.eval.perplexity import compare, read_text, token_windows

    with tempfile.TemporaryDirectory(prefix="fp8lm-demo-") as tmp:
        print(f"1/4 calibrating (the builtin set continued by the model to {DEMO_STATISTICS_TOKENS} tokens; "
              f"fp8lm calibrate takes 16,384 by default)...", flush=True)
        result = calibrate(args.model, "builtin", Path(tmp), max_seq_len=512, max_tokens=16, use_tqdm=False,
                           statistics_tokens=DEMO_STATISTICS_TOKENS)
        print(f"    {result.num_samples} samples, {sum(map(len, result.texts))} tokens -> {result.quant_config.name}")
        print("2/4 loading the model in float32 and in FP8 (QUANTIZE, FP8 KV cache)...", flush=True)
        # A fixed KV budget, so the block counts show what an FP8 cache holds.
        common = dict(max_model_len=1024, max_num_seqs=8, kv_cache_memory="64MiB")
        hp = LLM(args.model, **common)
        fp8 = LLM(args.model, quantization="inc", quant_config=str(result.quant_config), kv_cache_dtype="fp8_inc",
                  **common)
        print(f"    KV cache blocks for the same memory: float32 {hp.engine.num_kv_blocks}, "
              f"FP8 {fp8.engine.num_kv_blocks}")
        print("3/4 generating the same prompts in both precisions (greedy)...", flush=True)
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        conversations = [[{"role": "user", "content": p}] for p in DEMO_PROMPTS]
        timings = {}
        outputs = {}
        for label, llm in (("float32", hp), ("FP8", fp8)):
            start = time.perf_counter()
            outputs[label] = llm.chat(conversations, params, use_tqdm=False)
            n = sum(len(o.outputs[0].token_ids) for o in outputs[label])
            timings[label] = n / (time.perf_counter() - start)
        for i, prompt in enumerate(DEMO_PROMPTS):
            print(f"\n>>> {prompt}")
            for label in ("float32", "FP8"):
                print(f"[{label:>7}] {outputs[label][i].outputs[0].text.strip()}")
        print(f"\n    tokens/s (batched, greedy): float32 {timings['float32']:.1f}, FP8 {timings['FP8']:.1f}")
        print("4/4 accuracy on held-out text fp8lm did not calibrate on...", flush=True)
        windows = token_windows(hp.get_tokenizer(), read_text(None), 512)
        print("    " + compare(hp.engine, fp8.engine, windows).summary())
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fp8lm.entrypoints.calibrate import calibrate

    result = calibrate(args.model, args.dataset, Path(args.output), num_samples=args.num_samples,
                       max_seq_len=args.max_seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                       device=args.device, dtype=args.dtype, max_ppl_increase=args.max_ppl_increase,
                       max_weight_share=args.max_weight_share, max_attention_share=args.max_attention_share,
                       tensor_parallel_size=args.tensor_parallel_size, recipe=args.recipe,
                       exact_first_token=args.exact_first_token, statistics_tokens=args.statistics_tokens)
    print(f"measured {result.num_samples} samples ({result.num_truncated} truncated)")
    if args.max_ppl_increase is not None:
        print(f"blocklist chosen for --max-ppl-increase {args.max_ppl_increase}: {result.blocklist}")
    for path in result.measurement_files:
        print(f"  {path}")
    if args.recipe == "fp8lm":
        print("recipe fp8lm: exact scales, LM head kept, GPTQ-rounded weights and K smoothing from "
              f"{result.quant_config.parent}/inc_output_fp8lm_stats.safetensors. INC reads this config but ignores "
              "its \"fp8lm\" block (round-to-nearest weights, no K smoothing); --recipe inc writes INC's own.")
    print(f"QUANTIZE config: {result.quant_config}\n\nNext, run the FP8 model:\n"
          f"  QUANT_CONFIG={result.quant_config} fp8lm generate {args.model} --quantization inc "
          f"--kv-cache-dtype fp8_inc --prompt 'Hello'")
    return 0


def cmd_unify(args: argparse.Namespace) -> int:
    from fp8lm.quant.unify import unify_measurements

    for path in unify_measurements(Path(args.input), args.target_world_size, args.output and Path(args.output),
                                   args.observer):
        print(path)
    return 0


def _scoring_llm(args: argparse.Namespace, quantized: bool):
    """An engine sized for scoring one window at a time."""
    from fp8lm import LLM

    kwargs = engine_kwargs(args)
    kwargs.update(max_model_len=args.window, max_num_seqs=1, num_kv_blocks=-(-args.window // args.block_size),
                  skip_warmup=True)
    if not quantized:
        kwargs.update(quantization=None, kv_cache_dtype="auto")
    return LLM(args.model, **kwargs)


def cmd_eval(args: argparse.Namespace) -> int:
    from fp8lm.eval.perplexity import compare, perplexity, read_text, token_windows

    text = read_text(args.text)
    candidate = _scoring_llm(args, quantized=True)
    windows = token_windows(candidate.get_tokenizer(), text, args.window, args.max_windows)
    label = "FP8" if args.quantization else "model"
    if not args.compare:
        ppl = perplexity(candidate.engine, windows)
        print(f"{label} perplexity {ppl.value:.4f} over {ppl.num_tokens} tokens ({len(windows)} windows)")
        return 0
    reference = _scoring_llm(args, quantized=False)
    print(compare(reference.engine, candidate.engine, windows).summary())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fp8lm.eval.perplexity import read_text, token_windows
    from fp8lm.eval.report import is_attention_unit, module_sqnr, sensitivity, write_sqnr_report

    if not args.quantization:
        raise FP8LMError("report compares FP8 with high precision: pass --quantization inc (and QUANT_CONFIG)")
    candidate, reference = _scoring_llm(args, quantized=True), _scoring_llm(args, quantized=False)
    windows = token_windows(candidate.get_tokenizer(), read_text(args.text), args.window, args.max_windows)
    md, png = write_sqnr_report(module_sqnr(reference.engine, candidate.engine, windows), args.output)
    print(f"per-module SQNR: {md}, chart: {png}")
    if args.sensitivity:
        result = sensitivity(reference.engine, candidate.engine, windows, args.max_ppl_increase)
        for unit, pct in sorted(result.unit_gain_kl.items(), key=lambda kv: -kv[1]):
            what = "layers" if is_attention_unit(unit) else "decoder's Linear weights"
            print(f"  {unit:31s} mean KL -{pct:.5f} when only it is kept high "
                  f"({100 * result.unit_share[unit]:.1f}% of the {what})")
        print(f"all FP8: {result.all_fp8_pct:+.2f}%; keeping {len(result.blocklist)} in high precision: "
              f"{result.with_blocklist_pct:+.2f}% ({result.with_blocklist_bound_pct:+.2f}% at the one-sided 95% "
              f"bound; {100 * result.kept_share:.1f}% of the weights and {100 * result.kept_attention_share:.0f}% of "
              f"the layers' attention high)")
        print('blocklist: {"names": ' + json.dumps(result.blocklist_names()) + "}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from fp8lm.entrypoints.quantize import quantize_to_folder
    from fp8lm.model.registry import resolve_model
    from fp8lm.quant.block_fp8 import save_block_fp8

    if args.format == "block-fp8":
        folder = save_block_fp8(resolve_model(args.model), Path(args.output), tuple(args.weight_block_size))
    else:
        folder = quantize_to_folder(args.model, Path(args.output), args.quant_config, args.kv_cache_dtype, args.dtype)
    print(f"wrote {folder}\nrun it with: fp8lm generate {folder} --prompt 'Hello'")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fp8lm.engine.config import EngineConfig, env_value
    from fp8lm.entrypoints.openai.chat_routes import ToolSettings
    from fp8lm.entrypoints.openai.guards import Access, default_allowed_hosts
    from fp8lm.entrypoints.openai.launch import rpc_timeout_seconds, run_server
    from fp8lm.model.config import ModelConfig
    from fp8lm.model.registry import resolve_model

    # Everything that can be checked without loading the model fails here, before the port opens.
    folder = resolve_model(args.model)
    ModelConfig.from_folder(folder)
    rpc_timeout_seconds()
    config = EngineConfig(model=str(folder), **engine_kwargs(args))
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise FP8LMError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
    open_paths = {"/health", "/metrics"} if args.metrics_without_key else {"/health"}
    hosts = frozenset(h.strip().lower() for h in args.allowed_hosts.split(",")) if args.allowed_hosts else \
        default_allowed_hosts(args.host)
    access = Access(args.api_key or env_value("API_KEY"), None if hosts and "*" in hosts else hosts, frozenset(open_paths))
    waiting = args.max_waiting_requests if args.max_waiting_requests is not None else 16 * config.max_num_seqs
    if args.max_request_body_bytes < 1 or not args.header_timeout_s > 0:
        raise FP8LMError("--max-request-body-bytes and --header-timeout-s must be positive")
    if waiting < 0:
        raise FP8LMError(f"--max-waiting-requests {waiting}: a number of sequences, or 0 for unbounded")
    limits = ServerLimits(max_body_bytes=args.max_request_body_bytes, max_waiting_sequences=waiting or None,
                          header_timeout_s=args.header_timeout_s, chat_special_tokens=args.chat_special_tokens)
    run_server(config, args.host, args.port, args.served_model_name or args.model, access, limits,
               ToolSettings(args.enable_auto_tool_choice, args.tool_call_parser))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fp8lm.eval import throughput

    benchmarks = {"throughput": throughput.main}
    benchmarks[args.which](args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8lm", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="obtain a known model and convert it once into the cache")
    p.add_argument("alias")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="complete one prompt")
    add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("calibrate", help="MEASURE mode over a dataset; writes measurements and a QUANTIZE config")
    p.add_argument("model")
    p.add_argument("--dataset", default="builtin", help="a .jsonl ({'text'} or {'messages'}), a text file, or builtin")
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--max-seq-len", type=int, default=1024, help="longer samples are truncated (with a warning)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32,
                   help="tokens generated per sample while measuring (--recipe inc: greedy, as INC; fp8lm: at least "
                        "this many, sampled, see --statistics-tokens)")
    p.add_argument("--output", required=True, help="folder for the measurement files and configs")
    p.add_argument("--max-ppl-increase", type=float, default=None,
                   help="keep the units (a layer's attention projections, MLP, or attention with its K/V cache) that "
                        "buy the most per price in high precision until FP8 costs at most this %% (at most "
                        "--max-weight-share of the Linear weights and --max-attention-share of the layers' attention)")
    p.add_argument("--max-weight-share", type=float, default=0.15,
                   help="--max-ppl-increase: the most of the decoder's Linear weights kept in high precision (0..1)")
    p.add_argument("--max-attention-share", type=float, default=0.3,
                   help="--max-ppl-increase: the most of the layers whose attention and K/V cache stay in high "
                        "precision (0..1)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="measure on N ranks: one file per rank")
    p.add_argument("--recipe", default="fp8lm", choices=("fp8lm", "inc"),
                   help="fp8lm: accuracy-first (exact scales, LM head kept, GPTQ rounding, K smoothing; "
                        "needs fp8lm to run); inc: INC's maxabs_hw config, nothing else")
    p.add_argument("--exact-first-token", action=argparse.BooleanOptionalAction, default=None,
                   help="fp8lm recipe (on by default): each sequence's first token (the attention sink) keeps its "
                        "K/V and its q·k and p·v terms in high precision (more accurate; one K/V row more per "
                        "cache block)")
    p.add_argument("--statistics-tokens", type=int, default=None,
                   help="fp8lm recipe: the fewest tokens it measures on (scales, GPTQ rounding, K smoothing; default "
                        "16384): shorter datasets are continued by the model itself (sampled, seeded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("unify-measurements", help="turn per-rank measurements of N ranks into M")
    p.add_argument("--input", required=True, help="the dump_stats_path prefix of the per-rank files")
    p.add_argument("--target-world-size", type=int, required=True)
    p.add_argument("--output", default=None, help="prefix of the unified files (default: the input prefix)")
    p.add_argument("--observer", default="maxabs")
    p.set_defaults(func=cmd_unify)

    p = sub.add_parser("eval", help="perplexity; --compare: FP8 vs unquantized (change, KL, top-1 agreement)")
    add_engine_args(p)
    add_scoring_args(p)
    p.add_argument("--compare", action="store_true", help="also run the unquantized model and compare")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="per-module SQNR table and chart; --sensitivity: per-layer perplexity cost")
    add_engine_args(p)
    add_scoring_args(p)
    p.add_argument("--output", default="fp8_report", help="path prefix of the .md table and .png chart")
    p.add_argument("--sensitivity", action="store_true")
    p.add_argument("--max-ppl-increase", type=float, default=1.0, help="target for the suggested blocklist (%%)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("quantize", help="write an FP8 checkpoint: compressed-tensors (QUANT_CONFIG) or block-FP8")
    p.add_argument("model")
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=("compressed-tensors", "block-fp8"), default="compressed-tensors",
                   help="compressed-tensors: the calibrated FP8 model of QUANT_CONFIG; block-fp8: weights per "
                        "block (no calibration; inputs scaled per token and group at run time), as Qwen3-FP8")
    p.add_argument("--weight-block-size", type=int, nargs=2, default=[128, 128], metavar=("N", "K"),
                   help="block-fp8: the block of weights one scale covers")
    p.add_argument("--quant-config", default=None, help="QUANT_CONFIG file (default: the environment variable)")
    p.add_argument("--kv-cache-dtype", default="fp8_inc", help="fp8_inc (FP8 KV scales in the folder) or auto")
    p.add_argument("--dtype", default="auto")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("serve", help="the OpenAI-compatible server (QUANT_CONFIG from the environment)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: FP8LM_API_KEY or "
                        "VLLM_API_KEY, which keep the key out of `ps`)")
    p.add_argument("--metrics-without-key", action="store_true", help="let /metrics answer without the API key")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values the server answers to, '*' for any (default: the "
                        "--host address and localhost; any Host when bound to 0.0.0.0 or ::)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: MODEL)")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="beyond this many waiting sequences (n per request), answer 503 with Retry-After "
                        "(default: 16 x max-num-seqs; 0: unbounded)")
    p.add_argument("--max-request-body-bytes", type=int, default=ServerLimits.max_body_bytes,
                   help="answer 413 to a bigger request body")
    p.add_argument("--header-timeout-s", type=float, default=ServerLimits.header_timeout_s,
                   help="close a connection that has not sent a request's headers within this many seconds")
    p.add_argument("--chat-special-tokens", action="store_true",
                   help="treat special-token strings inside chat messages as special tokens (default: as text, so "
                        "that no message can forge another turn)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model decide when to call the request's tools (tool_choice 'auto')")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help="how tool calls are read from the model's replies (with --enable-auto-tool-choice)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks: throughput (fp8lm vs transformers)")
    p.add_argument("which", choices=["throughput"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (--help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the README's demo: generate answers with SmolLM2")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=64)
    p.set_defaults(func=cmd_demo)
    return parser


def run_torchrun_worker(args: argparse.Namespace) -> int:
    """Under torchrun every process runs the same command line; ranks > 0 serve rank 0's steps."""
    from fp8lm.engine.config import EngineConfig
    from fp8lm.engine.model_host import WorkerEngine
    from fp8lm.engine.parallel import torchrun_info

    if args.func not in (cmd_serve, cmd_generate):
        raise FP8LMError(f"`fp8lm {args.command}` does not run under torchrun; serve and generate do")
    WorkerEngine(EngineConfig(model=args.model, **engine_kwargs(args)), torchrun_info(), "env://").serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    from fp8lm.engine.parallel import torchrun_info

    args = build_parser().parse_args(argv)
    launched = torchrun_info()
    prefix = f"[rank {launched.rank}] " if launched else ""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {prefix}%(name)s: %(message)s", stream=sys.stderr)
    try:
        if launched is not None and launched.rank != 0:
            return run_torchrun_worker(args)
        return args.func(args)
    except FP8LMError as e:
        if args.debug:
            raise
        print(f"fp8lm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fp8lm: interrupted", file=sys.stderr)
        return 130
