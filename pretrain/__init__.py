"""ReBased pretraining stack: models, data loading, training and evaluation."""
