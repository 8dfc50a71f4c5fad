"""Speech: the talker and Code2Wav co-scheduled on one device, every live stream at once."""
