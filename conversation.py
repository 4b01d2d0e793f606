"""
Conversations for nanoVT: LLaVA's chat templates, tokenised once, with LLaVA-1.5's labels.

Read top to bottom:
  render_segments / render_conversation   a LLaVA JSON conversation -> the prompt string of a template
                                          (plain / vicuna_v1 / mistral_instruct / vw_mistral / chatml;
                                          docs/data.md §Templates)
  tokenize_conversation                   -> (input_ids, labels): the prompt tokenised once, labels
                                          on the assistant's answers only (docs/data.md §Labels)
  tokenize_prompt                         the whole prompt at once: what tokenize_conversation's ids equal
  repair_conversations / check_conversations   LLaVA's repairs of a sample, and why one is unusable
                                          (docs/data.md §Bad data)
The tokenizers themselves: tokenizer.py. Datasets built from these: data.py.
"""

import re

IGNORE_INDEX = -100      # label of positions that carry no loss (torch's cross_entropy default)
IMAGE_TOKEN_ID = -200    # nanoVT's image placeholder: a sentinel outside every vocabulary
IMAGE_TAG = "<image>"    # marks the image in LLaVA's JSON and in rendered prompts
EOS_TAG = "</s>"         # end of an assistant turn in rendered prompts; always the tokenizer's eos id

SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("plain", "vicuna_v1", "mistral_instruct", "vw_mistral", "chatml")

# ChatML, as SmolLM2's GGUF chat_template writes it: every turn "<|im_start|>{role}\n{text}<|im_end|>\n",
# a system turn first (this default one when the conversation has none). The markers are control tokens
# of the tokenizer (GGUFBPETokenizer turns their text into their ids: <|im_start|> 1, <|im_end|> 2 = eos).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SYSTEM_CHATML = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _move_image_tag_to_front(turns, has_image):
    """LLaVA's rule: the human turn holding <image> becomes "<image>\\n" + the rest, stripped."""
    turns = [dict(t) for t in turns]
    tagged = [t for t in turns if IMAGE_TAG in t["value"]]
    if has_image and not tagged:  # an image with no tag: it belongs to the first question
        turns[0]["value"] = IMAGE_TAG + "\n" + turns[0]["value"]
    elif not has_image and tagged:
        raise ValueError("<image> tag but no image file")
    for t in turns:
        if IMAGE_TAG in t["value"]:
            t["value"] = (IMAGE_TAG + "\n" + t["value"].replace(IMAGE_TAG, "").strip()).strip()
    return turns


def render_segments(conversations, template, has_image=None):
    """The rendered prompt as [(text, supervised)] pieces; "".join(texts) is render_conversation().

    If the conversation ends with a human turn, the prompt ends with the assistant's prefix
    (the generation prompt used by sample.py and evaluation). A first turn {"from": "system"} replaces
    the template's system prompt (vicuna_v1, chatml; the others have none).
    """
    system = None
    if conversations and conversations[0]["from"] == "system":
        if template not in ("vicuna_v1", "chatml"):
            raise ValueError(f"template {template!r} has no system prompt")
        system, conversations = conversations[0]["value"], conversations[1:]
    has_image = any(IMAGE_TAG in t["value"] for t in conversations) if has_image is None else has_image
    turns = _move_image_tag_to_front(conversations, has_image)
    if template == "plain":  # stage I: the human text is dropped, only the caption is learned
        segs = [(IMAGE_TAG, False)] if has_image else []
        return segs + ([(turns[1]["value"] + "\n", True)] if len(turns) > 1 else [])
    segs = []
    for k, t in enumerate(turns):
        if template == "vicuna_v1":
            if t["from"] == "human":
                sys_prompt = (SYSTEM_VICUNA if system is None else system) + " " if k == 0 else ""
                segs.append((sys_prompt + "USER: " + t["value"] + " ASSISTANT: ", False))
            else:
                segs.append((t["value"] + EOS_TAG, True))
        elif template == "mistral_instruct":
            if t["from"] == "human":
                segs.append(("[INST] " + t["value"] + " [/INST] ", False))
            else:
                segs.append((t["value"] + " " + EOS_TAG, True))
        elif template == "vw_mistral":  # the VW-LMM authors' "mistral" style: no spaces around answers
            if t["from"] == "human":
                segs.append(("[INST] " + t["value"] + " [/INST]", False))
            else:
                segs.append((t["value"] + EOS_TAG, True))
        elif template == "chatml":
            if k == 0:
                segs.append((f"{IM_START}system\n{SYSTEM_CHATML if system is None else system}{IM_END}\n", False))
            if t["from"] == "human":
                segs.append((f"{IM_START}user\n{t['value']}{IM_END}\n", False))
            else:  # supervised: the answer and its <|im_end|>, as LLaVA supervises an answer and its end
                # token; not the "\n" after it, which only separates turns (generation stops at <|im_end|>)
                segs += [(f"{IM_START}assistant\n", False), (t["value"] + IM_END, True), ("\n", False)]
        else:
            raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    if turns[-1]["from"] == "human":
        if template == "chatml":  # generation prompt: the assistant turn's header
            segs.append((f"{IM_START}assistant\n", False))
        else:  # generation prompt: no trailing space after the prefix
            segs[-1] = (segs[-1][0].rstrip(" "), False)
    return segs


def render_conversation(conversations, template, has_image=None):
    """The prompt string of docs/data.md §Templates, with <image> and </s> as text."""
    return "".join(text for text, _ in render_segments(conversations, template, has_image))


_MARKERS = re.compile(re.escape(IMAGE_TAG) + "|" + re.escape(EOS_TAG))


def _dummy_prefix(tokenizer, marker):
    """Whether the text chunk after `marker` (None: the start) gets sentencepiece's dummy-prefix space.

    At the start and after <image>: yes, as LLaVA's tokenizer_image_token, which tokenises every
    chunk between images in its own call. After </s>: as the tokenizer is configured (legacy=True,
    the default: yes, as the slow LLaMA tokenizer LLaVA-1.5 trained with; legacy=False: no)."""
    return marker != EOS_TAG or getattr(tokenizer, "legacy", True)


def _tokenize_text(text, tokenizer, image_token_id, num_patches):
    """[(id, char_start, char_end)] for a rendered prompt: split only at <image> and </s>. Control-token
    text in a chunk (ChatML's <|im_start|> / <|im_end|>) becomes its id in the tokenizer's own encode
    (GGUFBPETokenizer), as `tokenizers` does with special tokens."""
    out, pos, marker = [], 0, None
    for m in list(_MARKERS.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if end > pos:  # each text chunk is tokenised once
            out += [(i, pos + s, pos + e) for i, s, e in
                    tokenizer.encode_with_offsets(text[pos:end], dummy_prefix=_dummy_prefix(tokenizer, marker))]
        if m:
            marker = m.group()
            ids = [image_token_id] * num_patches if m.group() == IMAGE_TAG else [tokenizer.eos_id]
            out += [(i, m.start(), m.end()) for i in ids]
            pos = m.end()
    return out


def tokenize_prompt(text, tokenizer, image_token_id=IMAGE_TOKEN_ID, num_patches=576):
    """BOS + the whole rendered prompt tokenised at once: the reference tokenize_conversation must equal."""
    out, pos, marker = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else [], 0, None
    for m in list(_MARKERS.finditer(text)) + [None]:
        end = m.start() if m else len(text)
        if end > pos:
            out += tokenizer.encode(text[pos:end], dummy_prefix=_dummy_prefix(tokenizer, marker))
        if m:
            marker = m.group()
            out += [image_token_id] * num_patches if m.group() == IMAGE_TAG else [tokenizer.eos_id]
            pos = m.end()
    return out


def _check_chatml(tokenizer):
    """ChatML's markers must be control tokens of the tokenizer, and <|im_end|> its eos (where generation
    stops); otherwise they would be tokenised as text and the labels would teach no end of turn."""
    specials = getattr(tokenizer, "specials", {})
    where = getattr(tokenizer, "path", type(tokenizer).__name__)
    if IM_START not in specials or IM_END not in specials:
        raise ValueError(f"template chatml needs a tokenizer with {IM_START} and {IM_END} as control tokens (a GGUF "
                         f"file's with a ChatML chat_template, such as SmolLM2's); {where} has none")
    if specials[IM_END] != tokenizer.eos_id:
        raise ValueError(f"template chatml: {where}'s eos is token {tokenizer.eos_id}, not {IM_END} "
                         f"({specials[IM_END]}), so generation would not stop at the end of a turn")


def tokenize_conversation(conversations, tokenizer, template, image_token_id=IMAGE_TOKEN_ID,
                          num_patches=576, has_image=None):
    """(input_ids, labels) of one conversation: LLaVA-1.5's input_ids and supervised positions.

    The rendered prompt is tokenised once; a token is supervised if it starts inside an assistant
    answer or its </s>, or in the space that ends the user segment right before an answer
    (below). So the ids are, by construction, those of the whole prompt, and LLaVA's
    "tokenization mismatch" (per-round lengths, counted from separately tokenised rounds, that
    disagree with the whole prompt; LLaVA then masks the whole sample) cannot happen: no length
    is counted apart from the one tokenisation.
    Labels are IGNORE_INDEX on BOS, system prompt, user turns and image positions.
    """
    if template == "chatml":
        _check_chatml(tokenizer)
    segs = render_segments(conversations, template, has_image)
    spans, pos = [], 0
    for k, (text, supervised) in enumerate(segs):
        start = pos
        # Why the "▁" before some answers is supervised: LLaVA (preprocess_v1 / preprocess_llama_2)
        # masks len(tokens("... ASSISTANT: ")) - 2 tokens of a round, BOS and the piece of that
        # trailing space; everything after is supervised. When an answer starts with a character
        # the tokenizer does not join to a preceding space (a digit, CJK, a newline, an emoji with
        # the LLaMA-2 and Mistral tokenizers), the space stays a bare "▁" piece and LLaVA supervises
        # it, so a model learns to start such answers. The space belongs to the answer's span here.
        if supervised and k and not segs[k - 1][1] and segs[k - 1][0].endswith(" "):
            start -= 1
        if supervised:
            spans.append((start, pos + len(text)))
        pos += len(text)
    # BOS as an id, plain included (as LLaVA), unless the tokenizer's config says add_bos_token: false
    input_ids = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else []
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, s, e in _tokenize_text("".join(t for t, _ in segs), tokenizer, image_token_id, num_patches):
        # a token that starts in the user segment stays with it, even if it runs into the answer
        # ("](" with vw_mistral's "[/INST](b)"): LLaVA counts it in len(tokens(instruction))
        hit = any(a <= s < b for a, b in spans)
        input_ids.append(i)
        labels.append(i if hit and i != image_token_id else IGNORE_INDEX)
    return input_ids, labels


REPAIRS = {"first": "dropped a first turn from gpt", "last": "dropped a last question without an answer"}


def repair_conversations(sample):
    """(sample, repairs): the sample with LLaVA's repairs made, and their names (REPAIRS values).

    A first turn from gpt is dropped (LLaVA's preprocess does source[1:]). A last human turn
    without an answer is dropped, so the answered turns before it are kept (LLaVA would mask the
    whole sample). Anything else is left for check_conversations to judge. The input is not changed.
    """
    turns = sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return sample, []
    repairs = []
    if turns and turns[0].get("from") == "gpt":
        turns, repairs = turns[1:], repairs + [REPAIRS["first"]]
    if len(turns) > 1 and turns[-1].get("from") == "human":
        turns, repairs = turns[:-1], repairs + [REPAIRS["last"]]
    return ({**sample, "conversations": turns} if repairs else sample), repairs


def check_conversations(sample):
    """Why a LLaVA JSON sample is unusable, or None if it is fine (cheap: text and field types only;
    run repair_conversations first to get LLaVA's repairs)."""
    if not isinstance(sample, dict):
        return f"not a JSON object ({type(sample).__name__})"
    image = sample.get("image")
    if image is not None and not isinstance(image, str):
        return f"image field is not a string ({type(image).__name__}; one image path per sample)"
    turns = sample.get("conversations")
    if turns is not None and not isinstance(turns, list):
        return f"conversations is not a list ({type(turns).__name__})"
    if not turns:
        return "empty conversations"
    if not all(isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
               for t in turns):
        return "malformed turn (needs from: human|gpt and a string value)"
    if turns[0]["from"] != "human":
        return "first turn is from the assistant"
    if any(t["from"] != ("human", "gpt")[k % 2] for k, t in enumerate(turns)):
        return "turns do not alternate human/gpt"
    if turns[-1]["from"] != "gpt":
        return "last turn has no answer"
    n_tags = sum(t["value"].count(IMAGE_TAG) for t in turns)
    if n_tags > 1:
        return f"{n_tags} <image> tags (one image per sample)"
    if any(IMAGE_TAG in t["value"] for t in turns if t["from"] == "gpt"):
        return "<image> in an assistant turn"
    if n_tags and not sample.get("image"):
        return "<image> tag but no image file"
    return None


# ----------------------------------------------------------------------------------------------
# The same templates in Jinja, for an exported model's chat_template (transformers' apply_chat_template,
# lmms-eval, pipeline("image-text-to-text")). Messages are transformers' {"role", "content"}, content a
# string or a list of {"type": "image"} / {"type": "text", "text": ...} parts. A user message is turned
# into the turn value of LLaVA's JSON first, so render_segments' rules apply: with an image, "<image>\n"
# then the text stripped (_move_image_tag_to_front); without, the text as it is. BOS is not written: the
# tokenizer adds it (add_bos_token), as it does for llava-hf. tests/test_export.py renders every template
# through transformers and compares the ids with tokenize_prompt's.

_JINJA_VALUE = """\
{%- macro value(message, image_tag) -%}
{%- if message['content'] is string -%}
{%- set text = message['content'] -%}
{%- set images = 1 if '<image>' in text else 0 -%}
{%- set text = text.replace('<image>', '') -%}
{%- else -%}
{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}
{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}
{%- endif -%}
{%- if images > 1 -%}{{ raise_exception('one image per conversation') }}{%- endif -%}
{%- if images -%}{{ (image_tag + (text | trim)) | trim }}{%- else -%}{{ text }}{%- endif -%}
{%- endmacro -%}
"""

# per template: (the user turn around {value}, the assistant turn around {value}, the generation prompt)
_JINJA_TURNS = {
    "vicuna_v1": ("{system}USER: {value} ", "ASSISTANT: {value}{eos}", "ASSISTANT:"),
    "mistral_instruct": ("[INST] {value} [/INST]", " {value} {eos}", ""),
    "vw_mistral": ("[INST] {value} [/INST]", "{value}{eos}", ""),
}


def hf_chat_template(template, legacy=True):
    """The Jinja chat template that renders `template` as render_conversation does. `legacy`: the
    tokenizer's; with legacy=False the exported tokenizer adds no dummy-prefix space after a special
    token, so the template writes the space that nanoVT's tokenisation puts after <image> ("<image> \\n"
    gives the same pieces as nanoVT's "<image>\\n", tokenizer.py _sentencepiece_json)."""
    space = "" if legacy else " "
    tag = f"'<image>{space}\\n'"
    literal = lambda part: "{{ '" + part + "' }}" if part else ""  # noqa: E731
    if template == "plain":  # stage I: the image, then the caption; the question is not shown
        return _JINJA_VALUE + (
            "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
            "{{ '<image>' if value(message, " + tag + ").startswith('<image>') }}"
            "{%- elif message['role'] == 'assistant' -%}" + literal(space) + "{{ value(message, '') }}" + literal("\\n") +
            "{%- endif -%}{%- endfor -%}")
    if template == "chatml":  # SmolLM2's template, with the image placement of the user message above
        return _JINJA_VALUE + (
            "{%- for message in messages -%}"
            "{%- if loop.first and message['role'] != 'system' -%}"
            "{{ '" + f"{IM_START}system\\n{SYSTEM_CHATML}{IM_END}\\n" + "' }}{%- endif -%}"
            "{{ '" + IM_START + "' + message['role'] + '\\n' }}{{ value(message, '<image>\\n') }}"
            "{{ '" + IM_END + "\\n' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '" + IM_START + "assistant\\n' }}{%- endif -%}")
    if template not in _JINJA_TURNS:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    user, assistant, generation = _JINJA_TURNS[template]

    def turn(fmt):
        before, _, after = fmt.replace("{system}", "").partition("{value}")
        after, eos, tail = after.partition("{eos}")
        return (literal(before) + "{{ value(message, " + tag + ") }}" + literal(after)
                + ("{{ eos_token }}" if eos else "") + literal(tail))
    if "{system}" in user:  # vicuna_v1: LLaVA's system prompt, or a system message's text in its place
        head = ("{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' "
                "else '" + SYSTEM_VICUNA.replace("'", "\\'") + "' -%}")
        user_turn = "{{ system + ' ' if loop.first }}" + turn(user)
    else:
        head = ("{%- if messages and messages[0]['role'] == 'system' -%}{{ raise_exception('" + template +
                " has no system prompt') }}{%- endif -%}")
        user_turn = turn(user)
    return _JINJA_VALUE + head + (
        "{%- for message in messages | rejectattr('role', 'equalto', 'system') -%}"
        "{%- if message['role'] == 'user' -%}" + user_turn +
        "{%- elif message['role'] == 'assistant' -%}" + turn(assistant) +
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + literal(generation) + "{%- endif -%}")
