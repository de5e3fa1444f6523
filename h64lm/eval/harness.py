"""lm-evaluation-harness over our model: `H64LMEvalLM` and `run_tasks`.

The class derives from lm-eval's `TemplateLM`, so contexts and continuations are split into
tokens exactly as its `HFLM` splits them (trailing spaces move to the continuation; an empty
context becomes the prefix token); only the scoring runs through our model: left-padded batches
(positions follow the attention mask, so padding changes nothing) and our KV-cache generation.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from h64lm.hf.export import hf_tokenizer
from h64lm.model import H64LMForCausalLM, left_pad

__all__ = ["H64LMEvalLM", "run_tasks"]


class H64LMEvalLM(TemplateLM):
    """`model` (H64LMForCausalLM) + `tokenizer` (folder, our Tokenizer or a HF tokenizer).

    `add_bos_token=None` encodes as the tokenizer's own default, as HFLM does; `max_length`
    defaults to model.max_position_embeddings (longer inputs are left-truncated)."""

    def __init__(self, model: H64LMForCausalLM, tokenizer: Any, device: str = "cpu",
                 batch_size: int = 8, max_length: Optional[int] = None,
                 add_bos_token: Optional[bool] = None, max_gen_toks: int = 256) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be a positive integer")
        self.model = model.to(device).eval()
        self.tokenizer = hf_tokenizer(tokenizer)
        self._device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.add_bos_token = add_bos_token
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # what an empty context is conditioned on (as HFLM)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs) -> List[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def _batches(self, items: Sequence, key) -> List[List[int]]:
        """Indices of `items`, longest first (similar lengths pad little), in batch_size chunks."""
        order = sorted(range(len(items)), key=lambda i: -key(items[i]))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> List[Tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (sum log p(continuation),
        whether greedy decoding would produce the continuation)."""
        results: List[Tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in self._batches(requests, lambda r: len(r[1]) + len(r[2])):
            rows, targets = [], []
            for i in batch:
                _, context, continuation = requests[i]
                # the model reads all but the last token; keep at most max_length of them
                rows.append((context + continuation)[-(self.max_length + 1):][:-1])
                targets.append(continuation)
            ids, mask = left_pad(rows, self.eot_token_id, self._device)
            logprobs = F.log_softmax(self.model(ids, attention_mask=mask,
                                                router_stats=False).logits.float(), dim=-1)
            for i, row_logprobs, target in zip(batch, logprobs, targets):
                tail = row_logprobs[-len(target):]  # [len(target), V], rows end at the last col
                target_ids = torch.tensor(target, device=self._device)
                score = tail.gather(-1, target_ids[:, None]).sum().item()
                results[i] = (score, bool((tail.argmax(-1) == target_ids).all()))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Sum of token log-probabilities of each whole text, in disjoint windows of at most
        max_length predictions (the first conditioned on the prefix token), as HFLM."""
        totals = []
        for request in requests:
            (string,) = request.args
            windows = [(None,) + lm_utils.make_disjoint_window(w)
                       for w in lm_utils.get_rolling_token_windows(
                           token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                           max_seq_len=self.max_length, context_len=1)]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, per the task's gen_kwargs) continuation of each context with our
        KV-cache `generate`, cut at the first stop sequence."""
        eos = self.tokenizer.decode([self.eot_token_id])
        outputs: List[str] = [""] * len(requests)
        contexts = [self.tok_encode(r.args[0]) or [self.prefix_token_id] for r in requests]
        settings = [json.dumps(r.args[1], sort_keys=True, default=str) for r in requests]
        for setting in sorted(set(settings)):
            same = [i for i, s in enumerate(settings) if s == setting]
            kwargs = normalize_gen_kwargs(dict(requests[same[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be < max_length={self.max_length}")
            temperature = kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0
            for batch in self._batches(same, lambda i: len(contexts[i])):
                rows = [contexts[i][-(self.max_length - max_new):] for i in batch]
                ids, mask = left_pad(rows, self.eot_token_id, self._device)
                tokens = self.model.generate(ids, max_new, temperature=temperature,
                                             attention_mask=mask, eos_token_id=self.eot_token_id,
                                             pad_token_id=self.eot_token_id)
                for i, new in zip(batch, tokens[:, ids.shape[1]:].tolist()):
                    text = self.tokenizer.decode(new, skip_special_tokens=False)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


def run_tasks(model: H64LMForCausalLM, tokenizer: Any, tasks: List[str], device: str = "cpu",
              batch_size: int = 8, limit: Optional[Union[int, float]] = None,
              out_dir: Optional[Union[str, Path]] = None, include_path: Optional[str] = None,
              num_fewshot: Optional[int] = None, include_defaults: bool = True,
              **lm_kwargs) -> Dict[str, Any]:
    """`lm_eval.simple_evaluate` on our model. `include_path` adds task YAMLs (e.g. from
    `build_local_tasks`); `include_defaults=False` skips indexing lm-eval's thousands of built-in
    tasks (~40 s here) when only local ones run. Writes `out_dir/results.json` when given and
    returns the harness's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = H64LMEvalLM(model, tokenizer, device=device, batch_size=batch_size, **lm_kwargs)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: check the names or include_path")
    results = simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                              task_manager=manager, log_samples=False, bootstrap_iters=0)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(
            results, indent=2, default=lm_utils.handle_non_serializable))
    return results
