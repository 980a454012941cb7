#!/usr/bin/env python3
"""One LoRA optimizer step in PyTorch + transformers + peft: the reference side of bench/train_step.cpp.

The same step as BM_train_step_cuda_bf16 (bench/train_step.cpp), as people run QLoRA-style fine-tuning with
the Hugging Face stack: a LlamaForCausalLM of Llama-2-7B shape with random weights (no download), bf16 base,
LoRA r = 64 (alpha 16, no dropout) on all seven linears of every block (q, k, v, o, gate, up, down), gradient
checkpointing on (per decoder layer), torch.optim.AdamW over the adapters (fp32 master weights), next-token
cross-entropy. For each micro-batch size it runs warm-up steps, then times steps with CUDA events and prints
one JSON line:

  {"impl": "pytorch+peft", "batch": B, "seq": S, "tokens_per_s": ..., "step_s": ..., "peak_bytes": ...,
   "torch": "2.x", "transformers": "4.x", "peft": "0.x", "device": "NVIDIA H100 ...", "attn": "sdpa"}

peak_bytes is torch.cuda.max_memory_allocated() over the timed steps (PyTorch's caching allocator peak, the
counterpart of our caching allocator's peak_allocated_bytes). A batch that runs out of memory prints
{"batch": B, "seq": S, "error": "out of memory"} and the script goes on.

Usage: tools/reference/peft_train_step.py [--batches 1,2,3,4] [--seq 2048] [--steps 3] [--warmup 1]
       [--layers 32] [--attn sdpa|eager|flash_attention_2]
(--layers < 32 gives a shallower model for a quick check; the comparison uses the default.)
"""

import argparse
import json
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,2,3,4", help="micro-batch sizes, comma-separated")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--attn", default="sdpa", help="attn_implementation passed to transformers")
    return p.parse_args()


def llama2_7b_config(transformers, layers, attn):
    # meta-llama/Llama-2-7b-hf config.json (the same shape as bench/llama_shapes.hpp).
    return transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )


def build_model(torch, transformers, peft, args):
    config = llama2_7b_config(transformers, args.layers, args.attn)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)  # random init, bf16 base
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = peft.get_peft_model(model, lora)
    # Adapters in fp32 (master weights), as our adapters are; the frozen base stays bf16.
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def batch_of(torch, batch, seq, vocab):
    # The same token pattern as bench/train_step.cpp's batch_of: spread over the vocabulary.
    n = batch * (seq + 1)
    ids = (torch.arange(n, dtype=torch.int64) * 7919 + 17) % (vocab - 3) + 3
    ids = ids.view(batch, seq + 1)
    return ids[:, :-1].contiguous().cuda(), ids[:, 1:].contiguous().cuda()


def train_step(torch, model, optimizer, ids, targets):
    optimizer.zero_grad(set_to_none=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
    loss.backward()
    optimizer.step()
    return loss


def main():
    args = parse_args()
    try:
        import peft
        import torch
        import transformers
    except ImportError as e:
        print(f"peft_train_step.py: needs torch, transformers and peft: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("peft_train_step.py: no CUDA device", file=sys.stderr)
        return 2

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "device": torch.cuda.get_device_name(0), "attn": args.attn, "layers": args.layers, "rank": args.rank}
    model = build_model(torch, transformers, peft, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    vocab = model.config.vocab_size

    for batch in [int(b) for b in args.batches.split(",") if b]:
        record = {"impl": "pytorch+peft", "batch": batch, "seq": args.seq, **versions}
        try:
            ids, targets = batch_of(torch, batch, args.seq, vocab)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                train_step(torch, model, optimizer, ids, targets)
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            wall = time.perf_counter()
            for _ in range(args.steps):
                loss = train_step(torch, model, optimizer, ids, targets)
            stop.record()
            torch.cuda.synchronize()
            step_s = start.elapsed_time(stop) / 1e3 / args.steps
            record.update({
                "step_s": step_s,
                "tokens_per_s": batch * args.seq / step_s,
                "peak_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
                "loss": float(loss),
                "wall_s": time.perf_counter() - wall,
            })
        except torch.cuda.OutOfMemoryError:
            record["error"] = "out of memory"
        print(json.dumps(record), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
