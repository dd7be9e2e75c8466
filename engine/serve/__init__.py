"""A finished run at inference: per-group embedding tables, recommendations, peft adapter export."""
