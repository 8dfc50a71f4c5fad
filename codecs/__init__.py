"""omnitalk.codecs"""
