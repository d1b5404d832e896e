"""The official E5-V recipe, as E5-V's code runs it: the HF processor (PIL backend, left padding) on the main
process, the full ``LlavaNextForConditionalGeneration`` with ``output_hidden_states=True`` (logits over every
position, every hidden state kept), ``hidden_states[-1][:, -1]``, L2-normalised."""
from __future__ import annotations


def reference_embed(backbone, *, texts=None, images=None, batch: int):
    """The official recipe on ``texts`` or ``images``, in input order: unit vectors and each input's length in
    tokens. ``images`` are encoded files, decoded with PIL as the official code opens them."""
    import io

    import torch
    import torch.nn.functional as F
    from PIL import Image

    from .. import prompts

    model, processor = backbone.model, backbone.processor
    processor.tokenizer.padding_side = "left"
    chat = prompts.CHAT_FORMATS["llama3"]
    items = texts if texts is not None else images
    out, tokens = [], []
    with torch.inference_mode():
        for k in range(0, len(items), batch):
            chunk = items[k:k + batch]
            if texts is not None:
                enc = processor(text=[chat.format(prompts.TEXT).replace(prompts.SENT, t) for t in chunk],
                                return_tensors="pt", padding=True)
            else:
                decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk]
                enc = processor(text=[chat.format(prompts.IMAGE_PROMPT)] * len(chunk), images=decoded,
                                return_tensors="pt", padding=True)
            tokens.append(enc["attention_mask"].sum(1))
            enc = {key: v.to(backbone.device) for key, v in enc.items()}
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(backbone.dtype)
            hidden = model(**enc, output_hidden_states=True, return_dict=True).hidden_states[-1][:, -1]
            out.append(F.normalize(hidden.float(), dim=-1).cpu())
    return torch.cat(out).numpy(), torch.cat(tokens).numpy()
