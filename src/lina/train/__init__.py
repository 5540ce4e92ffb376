"""lina.train"""
