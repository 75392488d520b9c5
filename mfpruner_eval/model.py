"""lmms-eval model classes for MFPruner repos (any family: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL).

The repo is loaded through its own remote code (`AutoModelForImageTextToText` / `AutoProcessor`,
`trust_remote_code=True`), so the model that runs is the repo's MFPruner class, never a stock
class chosen by `model_type`. Pruning settings from `--model_args` are written into the config
before the weights load (and validated there), so every generate() and forward() call of the
run uses them.

model_args:
  pretrained            local folder or hub id of an MFPruner repo (required)
  visual_token_budget   visual tokens kept per image (replaces the repo's budget / ratio)
  visual_token_ratio    fraction kept per image (replaces the repo's budget / ratio)
  prune_visual_tokens   False runs the unpruned model (the 100% reference)
  mfpruner_cues         cues that vote, joined by "+": e.g. attention+uniqueness, or one cue
  relevance_source, min_votes, fill_by
                        the config fields of the same name
  revision, dtype ("auto", "bfloat16", ...), device, device_map, attn_implementation, batch_size

Batches are left-padded. Errors are never turned into empty answers: an exception in a batch
stops the run.

Multi-GPU / multi-node: under `accelerate launch` each process puts the whole model on its own
local GPU (`cuda:<local rank>`) and lmms-eval shards the requests over the global ranks.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

PRUNING_ARGS = (
    "visual_token_budget",
    "visual_token_ratio",
    "prune_visual_tokens",
    "mfpruner_cues",
    "relevance_source",
    "min_votes",
    "fill_by",
)
LOADING_ARGS = ("pretrained", "revision", "dtype", "device", "device_map", "attn_implementation", "batch_size")
IGNORED_ARGS = ("max_batch_size",)  # passed by lmms-eval's evaluator to every model
DEFAULT_MAX_NEW_TOKENS = 1024


# ----------------------------------------------------------------------------- settings


def pruning_overrides(args: dict) -> dict:
    """model_args -> config fields. A budget replaces the repo's ratio and vice versa."""
    overrides = {key: value for key, value in args.items() if value is not None}
    budget, ratio = overrides.get("visual_token_budget"), overrides.get("visual_token_ratio")
    if budget is not None and ratio is not None:
        raise ValueError("give only one of `visual_token_budget` and `visual_token_ratio` in model_args")
    if budget is not None:
        overrides["visual_token_ratio"] = None
    if ratio is not None:
        overrides["visual_token_budget"] = None
    if isinstance(overrides.get("mfpruner_cues"), str):  # commas separate model_args, so cues use "+"
        overrides["mfpruner_cues"] = overrides["mfpruner_cues"].split("+")
    if "prune_visual_tokens" in overrides and not isinstance(overrides["prune_visual_tokens"], bool):
        raise ValueError(f"`prune_visual_tokens` must be True or False, got {overrides['prune_visual_tokens']!r}")
    return overrides


def load_mfpruner_config(pretrained: str, revision: str | None, overrides: dict):
    """The repo's config with the overrides applied and validated by the repo's own config class."""
    config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=True)
    if not str(getattr(config, "model_type", "")).startswith("mfpruner"):
        raise ValueError(
            f"pretrained={pretrained!r} is not an MFPruner repo (model_type {config.model_type!r}); "
            "give a repo saved by an MFPruner model (its config.json has an `auto_map` and a model_type "
            "starting with 'mfpruner')"
        )
    if not overrides:
        return config
    values = config.to_dict()
    values.update(overrides)
    return type(config).from_dict(values)  # runs the config's validation (ValueError naming the field)


def load_multimodal_processor(pretrained: str, revision: str | None):
    """AutoProcessor, required to be a multimodal one (a tokenizer alone cannot encode images).

    No fallback to a tokenizer + image processor: how a prompt's image placeholder expands into
    visual tokens is each family's processor logic (LLaVA-NeXT's anyres tiles, Qwen2.5-VL's grid
    merge), and a copy of it here could drift from the processor the model was evaluated with."""
    advice = (
        "the repo needs its processor files (processor_config.json, or preprocessor_config.json naming a "
        "processor_class); Qwen2.5-VL's processor (Qwen2_5_VLProcessor) also needs torchvision in transformers 5.x"
    )
    try:
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=True)
    except (OSError, ImportError) as error:  # ImportError: a processor part needs a missing package
        raise ValueError(f"pretrained={pretrained!r}: no multimodal processor could be loaded ({error}); {advice}") from error
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ValueError(f"pretrained={pretrained!r}: AutoProcessor loaded {type(processor).__name__}, not a multimodal processor; {advice}")
    return processor


def resolve_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"`dtype` must be 'auto' or a torch dtype name such as 'bfloat16', got {dtype!r}")
    return getattr(torch, dtype)


def cut_at_stop_strings(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def stop_strings(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until", [])
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"generation_kwargs `until` must be a string or a list of strings, got {until!r}")
    return list(until)


def batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start : start + size]


# ----------------------------------------------------------------------------- simple model


class MFPrunerLMM(lmms):
    """lmms-eval "simple" model: generate_until (task prompt + doc_to_visual) and loglikelihood."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        revision: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        unknown = sorted(key for key in kwargs if key not in PRUNING_ARGS + IGNORED_ARGS)
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for --model mfpruner; allowed: {', '.join(LOADING_ARGS + PRUNING_ARGS)}"
            )
        if not pretrained:
            raise ValueError("model_args must give `pretrained` (a local MFPruner repo folder or a hub id)")
        if isinstance(batch_size, bool) or not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        self.batch_size_per_gpu = int(batch_size)

        overrides = pruning_overrides({key: kwargs.get(key) for key in PRUNING_ARGS})
        config = load_mfpruner_config(pretrained, revision, overrides)
        self.processor = load_multimodal_processor(pretrained, revision)  # before the weights: fail fast

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # data parallel: the whole model on this process's GPU
            if device_map not in (None, ""):
                raise ValueError("`device_map` cannot be combined with `accelerate launch` (each process holds the whole model)")
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index  # global rank: lmms-eval shards requests by it
            self._world_size = self.accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        self._model = AutoModelForImageTextToText.from_pretrained(
            pretrained,
            config=config,
            revision=revision,
            dtype=resolve_dtype(dtype),
            device_map=device_map or None,
            attn_implementation=attn_implementation,
            trust_remote_code=True,
        ).eval()
        if not hasattr(self._model, "last_pruning"):
            raise ValueError(f"pretrained={pretrained!r} loaded {type(self._model).__name__}, not an MFPruner model")
        if not device_map:
            self._model.to(self._device)
        else:
            self._device = self._model.device  # first shard: inputs go there

        self.processor.tokenizer.padding_side = "left"
        self.tokenizer = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        self.pretrained = pretrained

    # -- lmms-eval plumbing -----------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    def doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    # -- prompts ----------------------------------------------------------------------------

    def user_prompt(self, context: str, num_images: int) -> str:
        """The model's chat template around one user turn: the images first, then the task text
        (as LLaVA-1.5 and Qwen2.5-VL are evaluated), unless the task already placed them."""
        content = [] if self.image_token in context else [{"type": "image"}] * num_images
        content.append({"type": "text", "text": context})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, texts: list[str], images: list) -> dict:
        """Left-padded batch on the model's device; float inputs in the model's dtype."""
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return inputs.to(self.device, dtype=self.model.dtype)

    # -- generation -------------------------------------------------------------------------

    def generate_batch(self, prompts: list[str], images: list, gen_kwargs: dict) -> list[GenerationResult]:
        gen_kwargs = dict(gen_kwargs)
        until = stop_strings(gen_kwargs)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        settings = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "do_sample": do_sample,
        }
        if do_sample:
            settings["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                settings["top_p"] = float(gen_kwargs["top_p"])
        if self.tokenizer.pad_token_id is not None:
            settings["pad_token_id"] = self.tokenizer.pad_token_id

        inputs = self.encode(prompts, images)
        output = self.model.generate(**inputs, **settings)  # errors propagate: no silent empty answers
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        special = set(self.tokenizer.all_special_ids)
        results = []
        for text, tokens in zip(texts, new_tokens.tolist()):
            counts = TokenCounts(output_tokens=sum(token not in special for token in tokens))
            results.append(GenerationResult(text=cut_at_stop_strings(text, until).strip(), token_counts=counts))
        return results

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Simple requests: (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        prompts, images, kwargs = [], [], []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in [request.args for request in requests]:
            visuals = list(doc_to_visual(self.doc(task, split, doc_id)) or [])
            prompts.append(self.user_prompt(context, len(visuals)))
            images.append(visuals)
            kwargs.append(gen_kwargs)
        return self.generate_all(prompts, images, kwargs)

    def generate_all(self, prompts: list[str], images: list[list], kwargs: list[dict]) -> list[GenerationResult]:
        """Batches requests that share generation settings, longest prompt first; returns results
        in request order."""
        groups: dict[str, list[int]] = {}
        for index, gen_kwargs in enumerate(kwargs):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(index)
        results: list[GenerationResult | None] = [None] * len(prompts)
        progress = tqdm(total=len(prompts), disable=self.rank != 0, desc="mfpruner generate")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(prompts[i]))
            for batch in batches(indices, self.batch_size):
                flat_images = [image for i in batch for image in images[i]]
                outputs = self.generate_batch([prompts[i] for i in batch], flat_images, kwargs[batch[0]])
                for i, output in zip(batch, outputs):
                    results[i] = output
                progress.update(len(batch))
        progress.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model mfpruner does not implement multi-round generation")

    # -- log-likelihood ---------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Requests: (context, continuation, doc_to_visual, doc_id, task, split).

        Returns, per request, GenerationResult(text=(nll, is_greedy)): lmms-eval 0.7.3 turns a bare
        tuple into its string, and its multiple-choice scorer picks the choice by argmin, so the
        value is the negative log-likelihood of the continuation (summed over its tokens).

        The scoring forward prunes with the continuation in the prompt, so the instruction-relevance
        cue also sees the candidate answer (the paper's tables use generation tasks only)."""
        prompts, continuations, images = [], [], []
        for request in requests:
            if len(request.args) != 6:
                raise ValueError(
                    "--model mfpruner scores (context, continuation, visuals, ...) requests; "
                    "context-free requests (metric acc_mutual_info) are not supported"
                )
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            doc = self.doc(task, split, doc_id)
            if callable(continuation):  # output_type loglikelihood passes doc_to_target
                continuation = continuation(doc)
            visuals = list(doc_to_visual(doc) or [])
            prompts.append(self.user_prompt(context, len(visuals)))
            continuations.append(str(continuation))
            images.append(visuals)

        results: list[GenerationResult | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i] + continuations[i]))
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="mfpruner loglikelihood")
        for batch in batches(order, self.batch_size):
            scores = self.score_batch(
                [prompts[i] for i in batch],
                [continuations[i] for i in batch],
                [image for i in batch for image in images[i]],
            )
            for i, (nll, greedy) in zip(batch, scores):
                results[i] = GenerationResult(text=(nll, greedy), token_counts=None)
            progress.update(len(batch))
        progress.close()
        return results

    def continuation_length(self, prompt: str, continuation: str) -> int:
        """Tokens the continuation adds after the prompt (the prompt's own tokens must not change)."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
            raise ValueError(
                f"cannot score continuation {continuation!r}: appending it changes the prompt's tokens "
                "or adds none; give continuations that start a new token (e.g. with a space)"
            )
        return len(full_ids) - len(prompt_ids)

    @torch.no_grad()
    def score_batch(self, prompts: list[str], continuations: list[str], images: list) -> list[tuple[float, bool]]:
        """One pruned forward over prompt + continuation (left-padded, so every row ends at the
        last position and pruning, which only removes image tokens, leaves the tail aligned)."""
        lengths = [self.continuation_length(p, c) for p, c in zip(prompts, continuations)]
        inputs = self.encode([p + c for p, c in zip(prompts, continuations)], images)
        logits = self.model(**inputs, logits_to_keep=max(lengths) + 1).logits  # (B, max_len + 1, V)
        scores = []
        for row, length in enumerate(lengths):
            targets = inputs["input_ids"][row, -length:]  # (C,)
            log_probs = torch.log_softmax(logits[row, -length - 1 : -1].float(), dim=-1)  # (C, V)
            nll = -log_probs.gather(-1, targets[:, None]).sum().item()
            greedy = bool((log_probs.argmax(-1) == targets).all())
            scores.append((nll, greedy))
        return scores


# ----------------------------------------------------------------------------- chat model


class MFPrunerChatLMM(MFPrunerLMM):
    """lmms-eval chat model (what `--model mfpruner` resolves to): generate_until from the task's
    chat messages. Multiple-choice tasks need the simple class (`--force_simple`)."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Chat requests: (context, doc_to_messages, gen_kwargs, doc_id, task, split)."""
        prompts, images, kwargs = [], [], []
        for _, doc_to_messages, gen_kwargs, doc_id, task, split in [request.args for request in requests]:
            messages = ChatMessages(messages=doc_to_messages(self.doc(task, split, doc_id)))
            visuals, videos, audios = messages.extract_media()
            if videos or audios:
                raise ValueError(f"task {task!r} sends video or audio; --model mfpruner evaluates images and text")
            hf_messages = messages.to_hf_messages()
            prompts.append(self.processor.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True))
            images.append(list(visuals))
            kwargs.append(gen_kwargs)
        return self.generate_all(prompts, images, kwargs)
