import time

time.sleep(3600)  # the host gives up on it after its time limit
