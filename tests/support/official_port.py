"""An independent port of the released E5-V training step, for tests: the released ``ft_llm.py`` run by ``run.sh``
(``--is_sentemb --use_neg_sentence``, the Llama-3 branch) under transformers 4.41.2 and DeepSpeed ZeRO-2.

Written from the released code, statement by statement; it imports nothing of e5v's training code (only torch,
transformers and peft). Several GPUs are emulated in one process: each rank embeds its own micro-batch with
gradient, sees the other ranks' embeddings as constants (``dist.all_gather`` + putting its own back), and
back-propagates its own loss; DeepSpeed then averages the ranks' gradients, clips their norm and steps AdamW.
"""
from __future__ import annotations

import torch

# run.sh: TEMPLATE='*sent_0*\nSummary_above_sentence_in_one_word:' (single quotes: a backslash and an n)
RUN_SH_TEMPLATE = "*sent_0*\\nSummary_above_sentence_in_one_word:"
LLAMA3_TEMPLATE = ("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant"
                   "<|end_header_id|>\n\n \n")


def decode_4_41_2(tokenizer, ids) -> str:
    """``tokenizer.decode`` of transformers 4.41.2 for the Llama-3 tokenizer (clean_up_tokenization_spaces=True)."""
    out = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    out = out.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
    return out.replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve") \
        .replace(" 're", "'re")


def generate_sentemb_prompt(tokenizer, sentence: str, template: str, cutoff_len: int = 32) -> str:
    ids = tokenizer(sentence, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None,
                    add_special_tokens=False)["input_ids"]
    text = decode_4_41_2(tokenizer, ids)
    template = template.replace("_", " ").replace("*sep+*", "").replace("*cls*", "").replace("\\n", "\n")
    return template.replace("*sent 0*", text).strip()


def tokenize_row(tokenizer, row) -> dict:
    """``generate_and_tokenize_prompt``: anchor ids; positives in "labels"; hard negatives in "attention_mask"."""
    template = LLAMA3_TEMPLATE.format(RUN_SH_TEMPLATE)
    full, pos, neg = (generate_sentemb_prompt(tokenizer, s, template) for s in row)
    return {"input_ids": tokenizer(full)["input_ids"], "labels": tokenizer(pos)["input_ids"],
            "attention_mask": tokenizer(neg)["input_ids"]}


def collate(tokenizer, features: list[dict]) -> dict:
    """``DataCollatorForSeq2SeqForNeg`` with ``pad_to_multiple_of=8`` (padding side left)."""
    longest = max(len(f["labels"]) for f in features)
    longest = (longest + 7) // 8 * 8
    for f in features:
        f["labels"] = [-100] * (longest - len(f["labels"])) + f["labels"]
    out = {}
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = tokenizer.pad({"input_ids": [f[key] for f in features]}, padding=True, pad_to_multiple_of=8,
                                 return_tensors="pt")["input_ids"]
    return out


def pooled(model, tokenizer, inputs: dict):
    """``compute_loss`` up to the pooler output: z1, z2, z3 of one rank."""
    input_ids, labels, neg = inputs["input_ids"], inputs["labels"].clone(), inputs["attention_mask"].clone()
    pad = tokenizer.pad_token_id
    labels[labels < 0] = 0
    neg[neg < 0] = 0
    mw = max(input_ids.size(1), labels.size(1), neg.size(1))

    def left(t):
        return torch.cat([torch.full((t.size(0), mw - t.size(1)), pad, dtype=torch.long), t], dim=1)

    ids = torch.cat([left(input_ids), left(labels), left(neg)], dim=0)
    out = model(input_ids=ids, attention_mask=(ids > 0).long(), output_hidden_states=True, return_dict=True)
    h = out.hidden_states[-1][:, -1, :]
    n = h.size(0) // 3
    return h[:n], h[n:2 * n], h[2 * n:]


def rank_loss(z1s, z2s, z3s, rank: int, temp: float = 0.05):
    """The loss on ``rank``: others' embeddings as constants (all_gather), its own with gradient."""
    def gathered(zs):
        return torch.cat([z if r == rank else z.detach() for r, z in enumerate(zs)], 0)

    z1, z2, z3 = gathered(z1s), gathered(z2s), gathered(z3s)
    cos = torch.nn.CosineSimilarity(dim=-1)
    sim = cos(z1.unsqueeze(1).float(), z2.unsqueeze(0).float()) / temp
    sim = torch.cat([sim, cos(z1.unsqueeze(1), z3.unsqueeze(0)) / temp], 1)  # + a zero "weights" matrix
    return torch.nn.CrossEntropyLoss()(sim, torch.arange(sim.size(0)).long())


def load_model(checkpoint: str, *, r: int, alpha: int, dropout: float, seed: int):
    """The LLM alone as a causal LM (``language_model.save_pretrained`` of the converted LLaVA-NeXT), with LoRA on
    every linear layer but lm_head; ``set_seed(seed)`` before ``get_peft_model``; fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(full.config.text_config, dtype=torch.float32)
    state = {"model." + k: v for k, v in full.model.language_model.state_dict().items()}
    state["lm_head.weight"] = full.lm_head.weight
    model.load_state_dict(state)
    model.config.use_cache = False
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"])
    return get_peft_model(model, config)


def official_step(model, tokenizer, rank_rows: list[list[tuple[str, str, str]]], *, lr: float, clip: float,
                  eps: float, betas=(0.9, 0.999), optimizer=None):
    """One step on len(rank_rows) emulated GPUs: returns (loss, gradient norm before clipping, optimizer)."""
    tokenizer.pad_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    params = [p for p in model.parameters() if p.requires_grad]
    zs = [pooled(model, tokenizer, collate(tokenizer, [tokenize_row(tokenizer, row) for row in rows]))
          for rows in rank_rows]
    z1s, z2s, z3s = ([z[k] for z in zs] for k in range(3))
    world = len(rank_rows)
    grads = [torch.zeros_like(p) for p in params]
    losses = []
    for rank in range(world):
        loss = rank_loss(z1s, z2s, z3s, rank)
        losses.append(float(loss.detach()))
        for g, d in zip(grads, torch.autograd.grad(loss, params, retain_graph=rank < world - 1, allow_unused=True)):
            if d is not None:
                g += d
    grads = [g / world for g in grads]  # DeepSpeed's gradient averaging over the data-parallel ranks
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    scale = ((norm + 1e-6) / clip)  # ZeRO-2's clipping
    if scale > 1:
        grads = [g / scale for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert max(losses) - min(losses) < 1e-6  # every rank computes the same full-batch loss
    return losses[0], norm, optimizer
