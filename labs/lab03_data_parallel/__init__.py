"""Lab 03: data parallelism and collectives: ring collectives, naive and bucketed DDP, FedAvg, fault tolerance."""
