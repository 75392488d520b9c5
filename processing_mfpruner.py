"""Processor of MFPruner repos that carry a CLIP text tower (the paper's relevance cue).

It is the stock LLaVA (or LLaVA-NeXT) processor plus a second tokenizer, the CLIP tokenizer, which turns the
user's instruction into the text tower's inputs:

    inputs = processor(images=image, text=prompt, return_tensors="pt")
    model.generate(**inputs)   # input_ids, pixel_values, clip_input_ids, clip_attention_mask

How the instruction is found, per sample:
  1. `instruction=` given to the call (a string, or one per sample): used as is.
  2. `processor.apply_chat_template(messages, tokenize=True, ...)`: the text items of the last
     "user" message, joined by a space.
  3. A plain prompt string: the text of its last user turn, i.e. after the last `user_turn_prefix`
     and before the next `turn_end` ("USER:" and "ASSISTANT:" for LLaVA-1.5, derived from the chat
     template and stored in processor_config.json), with image placeholders removed. A prompt
     without the prefix counts as one user turn.

The CLIP tokenizer encodes the whole instruction (with its start/end tokens); ids and mask are
zero-padded to a multiple of the text tower's window (`clip_text_window`, 77 for CLIP) and cut
into window-sized segments, as CDPruner does. Outputs: `clip_input_ids` and `clip_attention_mask`
of shape (B, M, T), M = the most segments in the batch (all-zero rows pad shorter samples; the
model ignores segments whose mask is all zero).
"""

from __future__ import annotations

from transformers import BatchFeature, LlavaNextProcessor, LlavaProcessor, ProcessorMixin, Qwen2_5_VLProcessor

SENTINELS = ("\x00first-question\x00", "\x00first-answer\x00", "\x00last-question\x00")


def common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def user_turn_markers(render) -> tuple[str | None, str | None]:
    """(user_turn_prefix, turn_end) of a chat template, found by rendering a two-turn chat with
    sentinel texts. `render(messages)` returns the formatted prompt with a generation prompt.

    user_turn_prefix: what every user turn's text follows ("USER:"); turn_end: what follows it
    ("ASSISTANT:"). (None, None) when the template does not show the sentinels."""
    first, answer, last = SENTINELS
    messages = [
        {"role": "user", "content": [{"type": "text", "text": first}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "text", "text": last}]},
    ]
    text = render(messages)
    if any(text.count(s) != 1 for s in SENTINELS):
        return None, None
    before_first, rest = text.split(first)
    after_first, rest = rest.split(answer)
    between, after_last = rest.split(last)
    prefix = common_suffix(before_first, between).strip()  # the system prompt / previous turn differ
    end = common_prefix(after_first, after_last).strip()
    return prefix or None, end or None


def instruction_from_prompt(prompt: str, user_turn_prefix, turn_end, placeholders) -> str:
    """The text of the last user turn of a formatted prompt, without image placeholders."""
    if user_turn_prefix and user_turn_prefix in prompt:
        prompt = prompt.rsplit(user_turn_prefix, 1)[1]
    if turn_end and turn_end in prompt:
        prompt = prompt.split(turn_end, 1)[0]
    for placeholder in placeholders:
        prompt = prompt.replace(placeholder, " ")
    return " ".join(prompt.split())


def instruction_from_chat(conversation: list[dict]) -> str:
    """The text items of the last user message of a chat (messages as for apply_chat_template)."""
    users = [m for m in conversation if m.get("role") == "user"]
    if not users:
        raise ValueError("`conversation` has no message with role 'user': no instruction for the CLIP relevance cue")
    content = users[-1]["content"]
    if isinstance(content, str):
        return content.strip()
    return " ".join(item["text"].strip() for item in content if item.get("type") == "text")


def clip_segments(token_ids: list[list[int]], window: int) -> tuple[list, list]:
    """Per sample token ids -> (B, M, T) ids and mask, zero-padded, window-sized segments (CDPruner)."""
    per_sample = []
    for ids in token_ids:
        segments = max(1, -(-len(ids) // window))  # ceil
        padded = list(ids) + [0] * (segments * window - len(ids))
        mask = [1] * len(ids) + [0] * (segments * window - len(ids))
        per_sample.append(
            ([padded[i : i + window] for i in range(0, len(padded), window)],
             [mask[i : i + window] for i in range(0, len(mask), window)])
        )
    most = max(len(ids) for ids, _ in per_sample)
    empty = [0] * window
    input_ids = [ids + [empty] * (most - len(ids)) for ids, _ in per_sample]
    attention_mask = [mask + [empty] * (most - len(mask)) for _, mask in per_sample]
    return input_ids, attention_mask


class CLIPInstructionMixin:
    """Adds the CLIP tokenizer's segments of the instruction to a stock processor's outputs.

    For any MFPruner processor class: mix it in before the stock processor class and call
    `set_instruction_settings` in __init__ after ProcessorMixin.__init__ (which sets
    `clip_tokenizer` and `chat_template`)."""

    def set_instruction_settings(self, clip_text_window, user_turn_prefix, turn_end):
        if isinstance(clip_text_window, bool) or not isinstance(clip_text_window, int) or clip_text_window < 2:
            raise ValueError(f"`clip_text_window` must be an int >= 2 (the CLIP text tower's positions), got {clip_text_window!r}")
        self.clip_text_window = clip_text_window
        if user_turn_prefix is None and turn_end is None and self.chat_template is not None:
            user_turn_prefix, turn_end = user_turn_markers(
                lambda messages: self.apply_chat_template(messages, add_generation_prompt=True)
            )
        self.user_turn_prefix = user_turn_prefix
        self.turn_end = turn_end

    def instructions_for(self, text, instruction) -> list[str]:
        """One instruction per sample: the explicit ones, else the last user turn of each prompt."""
        if instruction is not None:
            instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        else:
            prompts = [text] if isinstance(text, str) else list(text)
            placeholders = [self.image_token, *self.tokenizer.all_special_tokens]
            instructions = [
                instruction_from_prompt(p, self.user_turn_prefix, self.turn_end, placeholders) for p in prompts
            ]
        if text is not None:
            samples = 1 if isinstance(text, str) else len(text)
            if len(instructions) != samples:
                raise ValueError(f"`instruction` gives {len(instructions)} instruction(s) for {samples} prompt(s)")
        if not all(isinstance(i, str) for i in instructions):
            raise ValueError(f"`instruction` must be a string or a list of strings, got {instruction!r}")
        return instructions

    def __call__(self, images=None, text=None, instruction=None, **kwargs):
        """The stock outputs plus `clip_input_ids` / `clip_attention_mask` (B, M, T) of the instruction."""
        outputs = super().__call__(images=images, text=text, **kwargs)
        if text is None and instruction is None:
            return outputs
        token_ids = self.clip_tokenizer(self.instructions_for(text, instruction), verbose=False)["input_ids"]
        clip_input_ids, clip_attention_mask = clip_segments(token_ids, self.clip_text_window)
        return_tensors = kwargs.get("return_tensors") or kwargs.get("text_kwargs", {}).get("return_tensors")
        return BatchFeature(
            {**outputs, "clip_input_ids": clip_input_ids, "clip_attention_mask": clip_attention_mask},
            tensor_type=return_tensors,
        )

    def apply_chat_template(self, conversation, *args, processor_kwargs: dict | None = None, **kwargs):
        """Stock apply_chat_template; when it tokenizes, the instruction is the last user message's text."""
        if kwargs.get("tokenize") and "instruction" not in (processor_kwargs or {}):
            batched = isinstance(conversation[0], (list, tuple))
            chats = conversation if batched else [conversation]
            instructions = [instruction_from_chat(chat) for chat in chats]
            processor_kwargs = {**(processor_kwargs or {}), "instruction": instructions}
        return super().apply_chat_template(conversation, *args, processor_kwargs=processor_kwargs, **kwargs)

    @property
    def model_input_names(self):
        return [*super().model_input_names, "clip_input_ids", "clip_attention_mask"]


class MFPrunerLlavaProcessor(CLIPInstructionMixin, LlavaProcessor):
    r"""LlavaProcessor + the CLIP tokenizer of the model's text tower (see the module docstring).

    clip_tokenizer: the tokenizer of the CLIP checkpoint the text tower came from.
    clip_text_window: the text tower's positions (CLIP: 77); segments are this long.
    user_turn_prefix / turn_end: markers of the last user turn in a plain prompt string
        (derived from the chat template when not given).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        clip_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        clip_text_window=77,
        user_turn_prefix=None,
        turn_end=None,
        **kwargs,
    ):
        # LlavaProcessor.__init__ hands exactly two parts to ProcessorMixin; with the third
        # (clip_tokenizer) its few lines are repeated here.
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = tokenizer.image_token if hasattr(tokenizer, "image_token") else image_token
        self.image_token_id = tokenizer.encode(self.image_token, add_special_tokens=False)[0]
        ProcessorMixin.__init__(self, image_processor, tokenizer, clip_tokenizer, chat_template=chat_template)
        self.set_instruction_settings(clip_text_window, user_turn_prefix, turn_end)


class MFPrunerLlavaNextProcessor(CLIPInstructionMixin, LlavaNextProcessor):
    r"""LlavaNextProcessor + the CLIP tokenizer of the model's text tower (LLaVA-1.6 / LLaVA-NeXT).

    Same arguments as `MFPrunerLlavaProcessor`: LlavaNextProcessor.__init__ takes the same
    parts and settings as LlavaProcessor's, so the same __init__ serves both.
    """

    __init__ = MFPrunerLlavaProcessor.__init__


class MFPrunerQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    r"""Qwen2_5_VLProcessor for images and text only, without a video processor.

    transformers 5.x builds the stock processor's video processor, which needs torchvision, even for
    images; this one takes (image_processor, tokenizer) and processes `images=` and `text=` exactly
    as the stock one does (the tiny Qwen2.5-VL repos of mfpruner_lib.tiny_models ship it, so that
    their AutoProcessor works without torchvision). Videos: the stock processor (with torchvision).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2_5_VLProcessor.__init__ hands three parts to ProcessorMixin; its few lines for two here.
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(
                "`videos`: this processor has no video processor (it needs torchvision in transformers 5.x); "
                "use the stock Qwen2_5_VLProcessor with torchvision installed for videos"
            )
        return super().__call__(images=images, text=text, **kwargs)


MFPrunerLlavaProcessor.register_for_auto_class("AutoProcessor")
MFPrunerLlavaNextProcessor.register_for_auto_class("AutoProcessor")
MFPrunerQwen2_5_VLProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["CLIPInstructionMixin", "MFPrunerLlavaNextProcessor", "MFPrunerLlavaProcessor", "MFPrunerQwen2_5_VLProcessor"]
