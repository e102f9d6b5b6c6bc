"""Lab 06: parameter-efficient fine-tuning: LoRA layers injected into HF transformers models (checked against peft),
QLoRA on an NF4 base, the memory arithmetic of full fine-tuning against LoRA and QLoRA, and a fine-tuning run."""

import logging

# transformers and peft import torchao when it is installed; torchao then warns once per compiled extension that does
# not match this torch build, and torch warns about its enums. The lab uses only torchao's pure-PyTorch NF4 tensor.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
