"""The Markdown tables of `experiments/bench.py`, from its JSON results."""

from __future__ import annotations

__all__ = ["render_markdown"]


def _mib(n: int) -> str:
    mib = n / 2**20
    return f"{mib:,.0f} MiB" if mib >= 10 else f"{mib:.2f} MiB"


def _train_table(rows: list[dict]) -> list[str]:
    lines = ["| shape | params (active) | batch | ours tok/s | HF tok/s | ours/HF | ours MFU | "
             "HF MFU | ours step memory (forward) | HF step memory (forward) | loader share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, h = r["ours"], r["hf"]
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M ({r['active_params'] / 1e6:.1f}M) "
            f"| {r['batch']} x {r['seq_len']} | {o['tokens_per_s']:,.0f} "
            f"| {h['tokens_per_s']:,.0f} | **{r['ratio']:.2f}x** "
            f"| {o['mfu']:.0%} ({o['flops'] / 1e9:,.0f} GFLOP/s) "
            f"| {h['mfu']:.0%} ({h['flops'] / 1e9:,.0f} GFLOP/s) "
            f"| {_mib(o['peak_step_bytes'])} ({_mib(o['peak_forward_bytes'])}) "
            f"| {_mib(h['peak_step_bytes'])} ({_mib(h['peak_forward_bytes'])}) "
            f"| {r['loader_share'] * 100:.2g}% |")
    lines.append("")
    lines += [f"MFU peak for {r['size']}: {r['peak_flops'] / 1e9:,.0f} GFLOP/s "
              f"({r['peak_source']}); load average "
              f"{', '.join(f'{a[0]:.1f}' for a in r['load_avg'])} before, after the timings."
              for r in rows]
    return lines


def _profile_table(r: dict) -> list[str]:
    prof = r["profile"]
    total = {name: sum(p.values()) for name, p in prof.items()}
    lines = [f"Profile of one {r['size']} training step (torch.profiler self time; the profiler "
             f"slows small ops, so read the shares):", "",
             "| kind of op | ours | HF |", "|---|---|---|"]
    for category in prof["ours"]:
        cells = [f"{prof[n][category] * 1e3:,.0f} ms ({prof[n][category] / total[n]:.0%})"
                 for n in ("ours", "hf")]
        lines.append(f"| {category} | {cells[0]} | {cells[1]} |")
    lines.append(f"| total | {total['ours'] * 1e3:,.0f} ms | {total['hf'] * 1e3:,.0f} ms |")
    return lines


def _experts_table(e: dict) -> list[str]:
    first, last = e["experts"][0], e["experts"][-1]
    load = ", ".join(f"{a[0]:.1f}" for a in e["load_avg"])
    lines = [f"Expert scaling ({e['size']} at hidden {e['hidden_size']}, every layer MoE, top-2, "
             f"fixed expert size, batch {e['batch']} x {e['seq_len']}, load average {load} before, "
             f"after): tokens/s at {last} experts over tokens/s at {first}: ours "
             f"**{e['ours_scaling']:.2f}**, HF {e['hf_scaling']:.2f}."]
    if e["seconds_per_added_expert"]:
        added = e["seconds_per_added_expert"]
        lines.append(f"Step time each added expert costs: ours {added['ours'] * 1e3:.1f} ms, "
                     f"HF {added['hf'] * 1e3:.1f} ms.")
    lines += ["", "| experts | ours step | HF step | ours tok/s | HF tok/s | ours/HF |",
              "|---|---|---|---|---|---|"]
    rates, seconds = e["tokens_per_s"], e["step_s"]
    for n in e["experts"]:
        o, h = rates[f"ours/{n}"], rates[f"hf/{n}"]
        lines.append(f"| {n} | {seconds[f'ours/{n}']:.3f} s | {seconds[f'hf/{n}']:.3f} s "
                     f"| {o:,.0f} | {h:,.0f} | {o / h:.2f}x |")
    return lines


def _generation_table(g: dict) -> list[str]:
    load = ", ".join(f"{a[0]:.1f}" for a in g["load_avg"])
    lines = [f"Greedy generation with KV cache ({g['size']}, prompt {g['prompt_len']}, "
             f"{g['new_tokens']} new tokens; load average {load} before, after):", "",
             "| batch | ours tok/s | HF tok/s | ours/HF | same tokens |", "|---|---|---|---|---|"]
    for b, ratio in g["ratio"].items():
        lines.append(f"| {b} | {g['tokens_per_s'][f'ours/{b}']:,.0f} "
                     f"| {g['tokens_per_s'][f'hf/{b}']:,.0f} | **{ratio:.2f}x** "
                     f"| {g['greedy_agreement'][b]:.0%} |")
    return lines


def render_markdown(results: dict) -> str:
    m = results["machine"]
    where = m.get("gpu") or m.get("cpu", "?")
    wait = ", ".join(f"{k}={v}" for k, v in m.get("omp_wait", {}).items()) or "OpenMP defaults"
    malloc = ", malloc keeps freed memory" if m.get("malloc_keeps_freed") else ""
    lines = [f"Machine: {where}, {m['cpus']} CPUs, {m['threads']} torch threads ({wait}{malloc}), load average "
             f"{m['load_avg'][0]:.1f} at start; torch {m['torch']}, transformers "
             f"{m['transformers']}; dtype {results['dtype']}"
             f"{', torch.compile' if results['compile'] else ''}, SDPA {results['sdpa']}.",
             f"Command: `{results['command']}`", ""]
    if results["train"]:
        lines += _train_table(results["train"]) + [""]
        for r in results["train"]:
            if r.get("profile"):
                lines += _profile_table(r) + [""]
    if results["experts"]:
        lines += _experts_table(results["experts"]) + [""]
    if results["generate"]:
        lines += _generation_table(results["generate"]) + [""]
    return "\n".join(lines)
