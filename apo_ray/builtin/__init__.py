"""The embedded default's synthetic task: a word-level language with a hidden gold reward.

Tiny models learn it on 2 CPU cores in minutes, and because the gold reward is known, APO's claims are
measurable: RM accuracy on pairs from any policy's distribution, and the gold score of aligned policies.

Format: a prompt is ``"topic : river ; about : night ; answer :"``; a response is a few words such as
``"the river is calm and it looks bright"``. Responses are stored as plain text without the end token;
token sequences fed to a model end with ``tokenizer.eos_token`` (``<eos>``), exactly as for HH-RLHF text.

One module per job: `oracle` (the vocabulary and the gold reward), `task` (the samplers, simulated human
preferences and the task's data), `models` (the tokenizer, the tiny policy and RM, the initial SFT),
`assets` (building them once and caching them on disk).
"""
