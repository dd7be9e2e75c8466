"""The recommender: grouped adapters, item encoders, projector + SASRec, the model every method trains."""
