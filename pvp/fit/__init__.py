"""`pvp fit`: from a video to an avatar (tracking, pivots, personalized prior, mappers)."""
