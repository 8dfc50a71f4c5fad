"""omnitalk.server"""
