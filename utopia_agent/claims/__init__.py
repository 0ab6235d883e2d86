"""What a claim's container is: its record and labels, who holds what, its CPU, memory and shm
shares, and its volumes. No docker here: the client and the policy read these too."""
