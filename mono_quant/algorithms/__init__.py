"""Data-driven weight rounding: input statistics, GPTQ, activation-aware clipping and scaling (AWQ)."""
