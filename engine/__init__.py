"""omnitalk.engine"""
