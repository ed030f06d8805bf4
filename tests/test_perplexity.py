"""token_nll against the loss HF computes for the same model and tokens."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.engine.perplexity import token_nll


def test_token_nll_is_hfs_causal_lm_loss_per_token():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    ids = torch.randint(0, 50, (3, 9))
    out = model(input_ids=ids, labels=ids)
    nll = token_nll(out.logits, ids)
    assert nll.shape == (3, 8) and (nll > 0).all()
    torch.testing.assert_close(nll.mean(), out.loss)
    # The same gradient as HF's loss, although the targets (not the logits) are shifted.
    ours = torch.autograd.grad(nll.mean(), out.logits, retain_graph=True)[0]
    hf = torch.autograd.grad(out.loss, out.logits)[0]
    torch.testing.assert_close(ours, hf)
    assert ours[:, -1].abs().max() == 0  # the last position predicts nothing
