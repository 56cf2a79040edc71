"""The TRL integration: `IDFTConfig` beside `IDFTTrainer`, and online mode (`online`: `HintedDataCollator`)."""
