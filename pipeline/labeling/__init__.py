"""Step labels per objective: Monte-Carlo continuations with a verifier (hindsight
values), judge votes over continuations, dialogue-prefix judging, outcome labels."""
