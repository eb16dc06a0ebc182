"""Stage 4, interventions: activation patching of next-token logits (patching) and of generated
answers (generation), and steering along found directions (steering)."""
