"""omnitalk.clients"""
