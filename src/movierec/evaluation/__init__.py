"""Ranking metrics and leave-one-out evaluation."""
