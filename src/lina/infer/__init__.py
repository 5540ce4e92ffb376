"""lina.infer"""
